"""Make the interop test fixtures in ``tests/fixtures/interop/`` by running the peers themselves.

Run with the peers' interpreter (torch 2.13.0 CPU, transformers 5.23.0, safetensors, flax, and
xlstm-jax from a source checkout; see ``/work/shared/PEERS.md``)::

    /work/peers/bin/python scripts/make_interop_fixtures.py [--only hf|xlstm-jax]

Nothing here imports ``xlstm_eqx``: the fixtures come from the peers alone, so the test suite
compares our converters and models with independent outputs. Everything is tiny and float32.

Hugging Face (``hf_<name>/``): a transformers ``xLSTMForCausalLM`` with random weights (every
parameter, gates included, so the gates matter), saved with ``save_pretrained`` (safetensors,
sharded for one config), plus ``expected.npz``: ``input_ids (B, S)``, ``logits (B, S, V)`` float32
and, for configs that can decode with transformers' cache, ``prompt_ids (1, P)`` and
``greedy_ids (1, P + 32)`` from ``generate(do_sample=False)``. The greedy path is checked to have a
top-2 logit margin of at least ``MIN_MARGIN`` at every step, so that it is well defined for an
implementation that agrees to ~1e-5. ``hf_small`` also gets a tiny ``tokenizer.json``.
``hf_train`` (``--only hf-train``): a one-block model with that tokenizer and transformers' float32
loss on a fixed batch (``loss.json``).

xlstm-jax (``xlstm_jax_<name>/``): the reference Flax model (``xlstm_parallel`` LM or Llama) run
on one CPU device in ``shard_map`` over a (dp, fsdp, pp, tp) = (1, 1, 1, 1) mesh, its parameters
randomised, stored flat (``a/b/c`` names, as the reference lays them out, tp axis included) in
``params.safetensors``; ``config.json`` holds ``{"model_kind", "model_config"}`` with the config
fields (the reference's names, which are ours), ``expected.npz`` the input and logits.

xlstm-jax trainer checkpoint (``xlstm_jax_mlstm_v1_orbax/``, ``--only xlstm-jax-orbax``, after the
xlstm-jax fixtures, with any interpreter that has jax, orbax-checkpoint and safetensors): the same
reference parameters in an orbax checkpoint laid out as xlstm-jax's trainer writes it, saved from 8
simulated devices (the reference trainer itself needs GPUs to run; see `make_xlstm_jax_orbax`).
"""

import argparse
import json
import os
import shutil
import sys
import types


OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "interop"
)
MIN_MARGIN = 1e-3
NEW_TOKENS = 32


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers


HF_CONFIGS = {
    # 4 heads, qk = v = D (a multiple of 64, which transformers' decode cache needs), sharded
    # safetensors, default soft caps, untied head, a chunk size that leaves a recurrent tail.
    "small": dict(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=4,
        qk_dim_factor=1.0,
        v_dim_factor=1.0,
        ffn_proj_factor=0.5,
        ffn_round_up_to_multiple_of=32,
        chunk_size=16,
        gate_soft_cap=15.0,
        output_logit_soft_cap=30.0,
        norm_eps=1e-6,
        tie_word_embeddings=False,
        weight_mode="single",
        seq_len=40,
        shard="64KB",
        seed=0,
    ),
    # 2 heads, smaller v than qk, 3 blocks, tied embeddings (the head stored equal to the
    # embedding: transformers does not tie by itself), other soft caps and eps, the fused
    # weight layout; logits only (transformers' cache rounds head dims up to 64 and cannot
    # decode this one).
    "fused_tied": dict(
        vocab_size=48,
        hidden_size=32,
        num_hidden_layers=3,
        num_heads=2,
        qk_dim_factor=1.0,
        v_dim_factor=0.5,
        ffn_proj_factor=1.0,
        ffn_round_up_to_multiple_of=32,
        chunk_size=8,
        gate_soft_cap=5.0,
        output_logit_soft_cap=10.0,
        norm_eps=1e-5,
        eps=1e-5,
        tie_word_embeddings=True,
        weight_mode="fused",
        seq_len=21,
        shard=None,
        seed=1,
    ),
}


def _randomise_torch(model, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embeddings" in name:
                new = torch.randn(p.shape, generator=gen)
            elif name.endswith("bias"):  # gate biases: memory on, some input gating
                new = 0.5 * torch.randn(p.shape, generator=gen)
                if "fgate" in name or "ifgate" in name:
                    new = new + 1.0
            elif p.ndim == 1:  # norm weights
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            else:  # (out, in)
                new = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            p.copy_(new)
        if model.config.tie_word_embeddings:
            # transformers' xLSTM does not tie the head itself (it keeps a separate lm_head
            # parameter); make it equal to the embedding so the checkpoint is really tied.
            model.lm_head.weight.copy_(model.backbone.embeddings.weight)


def _fuse_on_disk(out, num_blocks):
    """Rewrite a single-file "single" checkpoint in the "fused" layout transformers also reads."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    for i in range(num_blocks):
        m = f"backbone.blocks.{i}.mlstm_layer."
        f = f"backbone.blocks.{i}.ffn."
        groups = {
            m + "qkv_opreact.weight": [m + n + ".weight" for n in ("q", "k", "v", "ogate_preact")],
            m + "ifgate_preact.weight": [m + "igate_preact.weight", m + "fgate_preact.weight"],
            m + "ifgate_preact.bias": [m + "igate_preact.bias", m + "fgate_preact.bias"],
            f + "proj_up_gate_z.weight": [f + "proj_up_gate.weight", f + "proj_up.weight"],
        }
        for fused, parts in groups.items():
            tensors[fused] = np.concatenate([tensors.pop(p) for p in parts], axis=0)
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(out, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["weight_mode"] = "fused"
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)


def _load_fused(out):
    """transformers' ``from_pretrained`` of the fused checkpoint. Its weight init (run on load)
    crashes on fused gate biases, so it is skipped; every parameter is then checked to hold the
    stored value (nothing was left to the init)."""
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import xLSTMForCausalLM
    from transformers.models.xlstm import modeling_xlstm

    saved = modeling_xlstm.xLSTMPreTrainedModel._init_weights
    modeling_xlstm.xLSTMPreTrainedModel._init_weights = lambda self, module: None
    try:
        model = xLSTMForCausalLM.from_pretrained(out).eval()
    finally:
        modeling_xlstm.xLSTMPreTrainedModel._init_weights = saved
    assert model.config.weight_mode == "fused"
    stored = load_file(os.path.join(out, "model.safetensors"))
    state = model.state_dict()
    for name, value in state.items():
        src = stored.get(
            name, stored["backbone.embeddings.weight"] if name == "lm_head.weight" else None
        )
        assert src is not None and np.array_equal(value.numpy(), src), name
    return model


def _tokenizer_json(path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [
        "the quick brown fox jumps over the lazy dog",
        "an xlstm is a recurrent network with exponential gates and matrix memory",
        "equinox models are pytrees; jax transforms them",
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False
    )
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(path)


def _cpu_config(spec):
    """transformers' xLSTMConfig of ``spec`` with the kernels that run on a CPU in float32."""
    from transformers import xLSTMConfig

    return xLSTMConfig(
        **spec,
        mode="inference",
        chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native",
        step_kernel="native",
        autocast_kernel_dtype="float32",
        inference_state_dtype="float32",
        return_last_states=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def make_hf(name, spec):
    import numpy as np
    import torch
    from transformers import xLSTMForCausalLM

    spec = dict(spec)
    seq_len, shard, seed = spec.pop("seq_len"), spec.pop("shard"), spec.pop("seed")
    config = _cpu_config(spec)
    fused = config.weight_mode == "fused"
    if fused:  # transformers' weight init breaks on fused layouts: build single, fuse on disk
        config.weight_mode = "single"
    torch.manual_seed(seed)
    model = xLSTMForCausalLM(config).eval()
    _randomise_torch(model, seed)
    out = os.path.join(OUT, f"hf_{name}")
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(out, **kwargs)
    for f in os.listdir(out):  # only config + safetensors are kept
        if not (f == "config.json" or f.endswith(".safetensors") or f.endswith(".index.json")):
            os.remove(os.path.join(out, f))
    if fused:
        _fuse_on_disk(out, config.num_hidden_layers)
        model = _load_fused(out)

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, spec["vocab_size"], size=(2, seq_len))
    with torch.no_grad():
        logits = model(torch.tensor(ids), use_cache=False).logits.float().numpy()
    expected = {"input_ids": ids.astype(np.int32), "logits": logits.astype(np.float32)}
    can_decode = all(
        (spec["hidden_size"] * spec[f]) % 64 == 0 for f in ("qk_dim_factor", "v_dim_factor")
    )
    if can_decode:
        prompt = rng.integers(0, spec["vocab_size"], size=(1, 6))
        with torch.no_grad():
            gen = model.generate(
                torch.tensor(prompt),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                use_cache=True,
            ).numpy()
            # The margin of every greedy choice, from full forward passes.
            full = model(torch.tensor(gen), use_cache=False).logits.float().numpy()[0]
        steps = full[prompt.shape[1] - 1 : -1]
        top2 = np.sort(steps, axis=-1)[:, -2:]
        margin = float(np.min(top2[:, 1] - top2[:, 0]))
        if margin < MIN_MARGIN:
            raise SystemExit(
                f"hf_{name}: greedy margin {margin:.2e} < {MIN_MARGIN}: change the seed"
            )
        assert np.array_equal(np.argmax(steps, -1), gen[0, prompt.shape[1] :])
        expected["prompt_ids"] = prompt.astype(np.int32)
        expected["greedy_ids"] = gen.astype(np.int32)
        print(f"hf_{name}: greedy margin {margin:.3g}")
    np.savez(os.path.join(out, "expected.npz"), **expected)
    if name == "small":
        _tokenizer_json(os.path.join(out, "tokenizer.json"), spec["vocab_size"])
    print(f"hf_{name}: logits {logits.shape}, |logits| max {np.abs(logits).max():.3g}")


# A checkpoint to train from (``hf_train/``, ``--only hf-train``): one block, the hf_small
# tokenizer, and transformers' own float32 loss (``labels=input_ids``: mean next-token
# cross-entropy) on a fixed batch in ``loss.json``, which `xlstm-eqx train --init-from` must
# reproduce on its first batch.
HF_TRAIN = dict(
    vocab_size=64,
    hidden_size=64,
    num_hidden_layers=1,
    num_heads=2,
    qk_dim_factor=0.5,
    v_dim_factor=1.0,
    ffn_proj_factor=1.0,
    ffn_round_up_to_multiple_of=32,
    chunk_size=16,
    gate_soft_cap=15.0,
    output_logit_soft_cap=30.0,
    norm_eps=1e-6,
    tie_word_embeddings=False,
    weight_mode="single",
    seed=5,
)


def make_hf_train():
    import numpy as np
    import torch
    from transformers import xLSTMForCausalLM

    spec = dict(HF_TRAIN)
    seed = spec.pop("seed")
    config = _cpu_config(spec)
    torch.manual_seed(seed)
    model = xLSTMForCausalLM(config).eval()
    _randomise_torch(model, seed)
    out = os.path.join(OUT, "hf_train")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for f in os.listdir(out):
        if not (f == "config.json" or f.endswith(".safetensors")):
            os.remove(os.path.join(out, f))
    _tokenizer_json(os.path.join(out, "tokenizer.json"), spec["vocab_size"])
    ids = np.random.default_rng(seed).integers(0, spec["vocab_size"], size=(2, 33))
    with torch.no_grad():
        loss = model(torch.tensor(ids), labels=torch.tensor(ids), use_cache=False).loss
    record = {"input_ids": ids.tolist(), "loss": float(loss.float())}
    with open(os.path.join(out, "loss.json"), "w") as fh:
        json.dump(record, fh)
    print(f"hf_train: transformers loss {record['loss']:.6f} on {ids.shape}")


# ----------------------------------------------------------------------------------------------
# xlstm-jax


XJ_CONFIGS = {
    # xLSTM-7B style blocks, scanned, rms out-norm, soft caps; tie_weights=True is ignored by
    # the Flax model (a quirk the converter must keep).
    "mlstm_v1": dict(
        kind="xlstm",
        seq_len=12,
        seed=2,
        model=dict(
            vocab_size=40,
            embedding_dim=32,
            num_blocks=2,
            context_length=12,
            tie_weights=True,
            norm_type="rmsnorm",
            norm_eps=1e-6,
            logits_soft_cap=30.0,
            lm_head_dtype="float32",
            dtype="float32",
            scan_blocks=True,
        ),
        block=dict(add_post_norm=False),
        layer=dict(layer_type="mlstm_v1", num_heads=2, qk_dim_factor=0.5, v_dim_factor=1.0),
        cell=dict(
            gate_soft_cap=15.0,
            igate_bias_init_range=-2.0,
            norm_type_v1="rmsnorm",
            add_qk_norm=True,
        ),
        ffn=dict(
            proj_factor=2.0, act_fn="swish", ff_type="ffn_gated", round_proj_up_to_multiple_of=32
        ),
    ),
    # Mamba-style blocks, unrolled, layernorm, headwise gates, q/k norms, post-norms, biases,
    # v dim != inner dim (so x_mlstm_conv_scaling exists), no soft caps;
    # add_post_blocks_norm=False is ignored by the Flax model (a quirk).
    "mlstm": dict(
        kind="xlstm",
        seq_len=10,
        seed=3,
        model=dict(
            vocab_size=36,
            embedding_dim=32,
            num_blocks=2,
            context_length=10,
            tie_weights=False,
            add_post_blocks_norm=False,
            norm_type="layernorm",
            norm_eps=1e-5,
            logits_soft_cap=None,
            lm_head_dtype="float32",
            dtype="float32",
            scan_blocks=False,
            bias=True,
        ),
        block=dict(add_post_norm=True),
        layer=dict(
            layer_type="mlstm",
            num_heads=2,
            proj_factor=1.0,
            round_proj_up_to_multiple_of=16,
            conv1d_kernel_size=3,
            qkv_proj_blocksize=4,
            v_dim_factor=0.5,
        ),
        cell=dict(gate_linear_headwise=True, add_qk_norm=True, igate_bias_init_range=0.0),
        ffn=None,
    ),
    # Llama, scanned, q/k norms, soft cap; the reference scales q by NH^-1/2 (NH=4, head_dim 8).
    "llama": dict(
        kind="llama",
        seq_len=9,
        seed=4,
        model=dict(
            vocab_size=32,
            embedding_dim=32,
            num_blocks=2,
            head_dim=8,
            qk_norm=True,
            use_bias=True,
            ffn_multiple_of=16,
            ffn_dim_multiplier=0.5,
            scan_blocks=True,
            dtype="float32",
            logits_soft_cap=20.0,
            theta=100.0,
        ),
    ),
}


def _jax_imports():
    sys.modules.setdefault("jax_triton", types.ModuleType("jax_triton"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    jax.config.update("jax_platforms", "cpu")
    return jax


def _fan_in(path, shape):
    """Input features of a reference kernel (tp / scan axes lead, so count from the end)."""
    module = path.split("/")[-2]
    if "conv" in path:  # (…, K, 1, C)
        return shape[-3]
    if module in ("q_proj", "k_proj", "v_proj", "qk_proj", "x_mlstm_conv_scaling"):
        return shape[-1]  # headwise (…, P, out/P, in/P)
    if module in ("igate", "fgate") and shape[-2] == 1:
        return shape[-1]  # headwise gate (…, NH, 1, in/NH)
    if module in ("dense_q", "dense_k", "dense_v"):
        return shape[-3]  # Llama (…, D, NH, hd)
    if module == "dense_out":
        return shape[-3] * shape[-2]  # Llama (…, NH, hd, D)
    return shape[-2]  # Dense (…, in, out)


def _randomise_flax(params, seed):
    """Random values for every leaf, keeping nn.Partitioned boxes."""
    import numpy as np
    from flax import linen as nn

    rng = np.random.default_rng(seed)

    def visit(node, path):
        out = {}
        for k, v in node.items():
            p = f"{path}/{k}" if path else k
            if isinstance(v, dict) or (hasattr(v, "items") and not isinstance(v, nn.Partitioned)):
                out[k] = visit(v, p)
                continue
            box = v if isinstance(v, nn.Partitioned) else None
            arr = np.asarray(box.value if box is not None else v)
            shape = arr.shape
            if k == "embedding":
                new = rng.standard_normal(shape)
            elif k == "scale":
                new = 1.0 + 0.2 * rng.standard_normal(shape)
            elif k == "learnable_skip":
                new = 1.0 + 0.3 * rng.standard_normal(shape)
            elif k == "bias":
                new = 0.5 * rng.standard_normal(shape) + (1.0 if "fgate" in p else 0.0)
            else:
                new = rng.standard_normal(shape) / _fan_in(p, shape) ** 0.5
            new = new.astype(np.float32)
            out[k] = box.replace_boxed(new) if box is not None else new
        return out

    return visit(params, "")


def _flat(params):
    import numpy as np
    from flax import linen as nn

    out = {}

    def visit(node, path):
        for k, v in node.items():
            p = f"{path}/{k}" if path else k
            if isinstance(v, nn.Partitioned):
                out[p] = np.asarray(v.value)
            elif hasattr(v, "items"):
                visit(v, p)
            else:
                out[p] = np.asarray(v)

    visit(params, "")
    return out


def build_reference(spec):
    """``(reference Flax model, our config dict)`` for an ``XJ_CONFIGS`` entry."""
    _jax_imports()
    from xlstm_jax.models.configs import ParallelConfig

    kind = spec["kind"]
    parallel = ParallelConfig(remat=(), fsdp_modules=())
    if kind == "xlstm":
        from xlstm_jax.models.xlstm_parallel.blocks.mlstm.block import mLSTMBlockConfig
        from xlstm_jax.models.xlstm_parallel.blocks.mlstm.cell import mLSTMCellConfig
        from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import mLSTMLayerConfig
        from xlstm_jax.models.xlstm_parallel.components.feedforward import FeedForwardConfig
        from xlstm_jax.models.xlstm_parallel.xlstm_lm_model import xLSTMLMModel, xLSTMLMModelConfig

        ffn = None if spec["ffn"] is None else dict(spec["ffn"], dtype="float32")
        config = xLSTMLMModelConfig(
            **spec["model"],
            parallel=parallel,
            mlstm_block=mLSTMBlockConfig(
                mlstm=mLSTMLayerConfig(
                    **spec["layer"],
                    embedding_dim=spec["model"]["embedding_dim"],
                    context_length=spec["model"]["context_length"],
                    dtype="float32",
                    mlstm_cell=mLSTMCellConfig(**spec["cell"]),
                ),
                feedforward=None
                if ffn is None
                else FeedForwardConfig(**ffn, embedding_dim=spec["model"]["embedding_dim"]),
                **spec["block"],
            ),
        )
        model = xLSTMLMModel(config)
        ours = dict(
            spec["model"],
            mlstm_block=dict(
                mlstm=dict(spec["layer"], mlstm_cell=dict(spec["cell"])),
                feedforward=ffn,
                **spec["block"],
            ),
        )
    else:
        from xlstm_jax.models.llama.llama import LlamaConfig, LlamaTransformer

        config = LlamaConfig(**spec["model"], parallel=parallel)
        model = LlamaTransformer(config)
        ours = dict(spec["model"])
    return model, ours


def reference_fns(model):
    """Jitted ``init(key, ids) -> params`` and ``apply(params, ids) -> logits`` of a reference
    model on one CPU device, inside ``shard_map`` over a (1, 1, 1, 1) mesh."""
    jax = _jax_imports()
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("dp", "fsdp", "pp", "tp"))

    def init_fn(key, x):
        return model.init({"params": key}, x, train=False)["params"]

    def apply_fn(p, x):
        return model.apply({"params": p}, x, train=False)

    def wrap(f):
        return jax.jit(
            jax.shard_map(f, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)
        )

    return wrap(init_fn), wrap(apply_fn)


def make_xlstm_jax(name, spec):
    jax = _jax_imports()
    import numpy as np
    from safetensors.numpy import save_file

    kind, seq_len, seed = spec["kind"], spec["seq_len"], spec["seed"]
    model, ours = build_reference(spec)
    init, apply = reference_fns(model)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, spec["model"]["vocab_size"], size=(2, seq_len)).astype(np.int32)
    params = init(jax.random.PRNGKey(seed), ids)
    params = _randomise_flax(jax.device_get(params), seed)
    logits = np.asarray(apply(params, ids), dtype=np.float32)

    out = os.path.join(OUT, f"xlstm_jax_{name}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    save_file(_flat(params), os.path.join(out, "params.safetensors"), metadata={"format": "flax"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model_kind": kind, "model_config": ours}, f, indent=2)
    np.savez(os.path.join(out, "expected.npz"), input_ids=ids, logits=logits)
    print(f"xlstm_jax_{name}: logits {logits.shape}, |logits| max {np.abs(logits).max():.3g}")


# ----------------------------------------------------------------------------------------------
# xlstm-jax's trainer checkpoint (orbax), saved on 8 devices


ORBAX_DEVICES = 8


def make_xlstm_jax_orbax(name, step=3):
    """``xlstm_jax_<name>_orbax/``: the reference parameters of ``xlstm_jax_<name>/`` saved the
    way xlstm-jax's trainer saves them (its ``ModelCheckpoint``: an orbax ``CheckpointManager``
    with ``step_prefix="checkpoint"`` and the items ``params`` (``StandardSave``), ``metadata``
    (JSON)), every array sharded over 8 simulated devices along its largest axis divisible by 8
    (replicated otherwise), and the arrays of ``…/sharded/…`` modules stored as their
    ``nn.Partitioned`` boxes store them (a ``value`` entry). ``config.json`` and ``expected.npz``
    are copied. Needs jax, orbax-checkpoint and safetensors only (no peer); run in a fresh process
    (the device count is set before jax starts)."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ORBAX_DEVICES}"
    jax = _jax_imports()
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from safetensors.numpy import load_file

    if len(jax.devices()) != ORBAX_DEVICES:
        raise SystemExit(f"need {ORBAX_DEVICES} devices, jax started with {len(jax.devices())}")
    src = os.path.join(OUT, f"xlstm_jax_{name}")
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    flat = load_file(os.path.join(src, "params.safetensors"))
    tree = {}
    for key, value in flat.items():
        axes = [d for d in np.argsort(value.shape)[::-1] if value.shape[d] % ORBAX_DEVICES == 0]
        spec = [None] * value.ndim
        if axes:
            spec[int(axes[0])] = "fsdp"
        arr = jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, P(*spec)), lambda idx, v=value: v[idx]
        )
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = {"value": arr} if "/sharded/" in key else arr
    with open(os.path.join(src, "config.json")) as f:
        ours = json.load(f)
    out = os.path.join(OUT, f"xlstm_jax_{name}_orbax")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True)
    manager = ocp.CheckpointManager(os.path.join(out, "checkpoints"), options=options)
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(tree),
            metadata=ocp.args.JsonSave({"model": ours["model_config"]}),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    for fname in ("config.json", "expected.npz"):
        shutil.copyfile(os.path.join(src, fname), os.path.join(out, fname))
    print(f"xlstm_jax_{name}_orbax: {len(flat)} arrays on {ORBAX_DEVICES} devices, step {step}")


# A LoRA adapter saved by peft (``peft_small/``, ``--only peft``, after ``hf_small``): rank 4,
# alpha 8 on every projection of transformers' xLSTM (the mLSTM layer's q/k/v, gate and output
# projections, the FFN's), A as peft initialises it and B random (peft starts it at zero, which
# would test nothing); ``expected.npz`` holds the peft model's logits on hf_small's input ids.
PEFT_TARGETS = [
    "q",
    "k",
    "v",
    "ogate_preact",
    "igate_preact",
    "fgate_preact",
    "out_proj",
    "proj_up_gate",
    "proj_up",
    "proj_down",
]


def make_peft():
    import numpy as np
    import peft
    import torch
    from transformers import xLSTMForCausalLM

    base_dir = os.path.join(OUT, "hf_small")
    model = xLSTMForCausalLM.from_pretrained(base_dir).eval()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PEFT_TARGETS, bias="none"
    )
    torch.manual_seed(3)
    model = peft.get_peft_model(model, config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    out = os.path.join(OUT, "peft_small")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = "../hf_small"  # no path of this machine
    with open(cfg_path, "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    for f in os.listdir(out):
        if f not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(out, f))
    ids = np.load(os.path.join(base_dir, "expected.npz"))["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor(ids.astype(np.int64)), use_cache=False).logits.float().numpy()
        base_logits = np.load(os.path.join(base_dir, "expected.npz"))["logits"]
    np.savez(os.path.join(out, "expected.npz"), input_ids=ids, logits=logits.astype(np.float32))
    print(
        f"peft_small: logits {logits.shape}, |peft - base| max {np.abs(logits - base_logits).max():.3g}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=("hf", "hf-train", "peft", "xlstm-jax", "xlstm-jax-orbax"),
        help="make only these fixtures",
    )
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    if args.only in (None, "hf"):
        for name, spec in HF_CONFIGS.items():
            make_hf(name, spec)
    if args.only in (None, "hf-train"):
        make_hf_train()
    if args.only in (None, "peft"):
        make_peft()
    if args.only in (None, "xlstm-jax"):
        for name, spec in XJ_CONFIGS.items():
            make_xlstm_jax(name, spec)
    if args.only == "xlstm-jax-orbax":  # from the xlstm-jax fixtures; a process of its own
        make_xlstm_jax_orbax("mlstm_v1")


if __name__ == "__main__":
    main()
