#!/usr/bin/env bash
# Install the peers that `xlstm-eqx bench` compares against, beside this package, in a virtualenv
# of their own (never the one the test suite runs in).
#
#   git clone https://github.com/NX-AI/xlstm-jax /somewhere/xlstm-jax
#   bash benchmarks/peers/install.sh /somewhere/xlstm-jax [VENV_DIR]   # VENV_DIR: ./peers-venv
#   VENV_DIR/bin/xlstm-eqx bench all
#
# TORCH_INDEX_URL: an index with torch's CPU-only wheels (without it pip picks whatever torch build
# the configured index serves, on Linux usually a CUDA one of several GB).
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1/pyproject.toml" ]; then
    echo "usage: $0 XLSTM_JAX_SOURCE_DIR [VENV_DIR]  (a checkout of NX-AI/xlstm-jax)" >&2
    exit 2
fi
XLSTM_JAX_SRC=$(cd "$1" && pwd)
VENV=${2:-peers-venv}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install)

# 1. torch first and pinned: the later packages accept it instead of pulling their own build.
"${PIP[@]}" torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# 2. the registry peers, at the versions the comparisons were checked with. triton: mlstm-kernels'
#    JAX package imports its Triton kernels even for the pure-JAX functions (a CPU-installable wheel).
"${PIP[@]}" jax==0.10.2 flax mlstm-kernels==2.0.6 transformers==5.23.0 xlstm==2.0.6 safetensors triton
# 3. xlstm-jax is not on the registry: editable from its source, without its pinned GPU stack; the
#    imports its package and its trainer make at import time, added by hand.
"${PIP[@]}" --no-deps -e "$XLSTM_JAX_SRC"
"${PIP[@]}" tensorflow-cpu dacite tabulate chex pandas tensorboard wandb
# 4. this package, editable, so the bench runs the checkout's code.
"${PIP[@]}" -e "$REPO"

# The check the bench itself relies on (the jax_triton stand-in: see README.md beside this script).
"$VENV/bin/python" - <<'PY'
import sys, types
sys.modules.setdefault("jax_triton", types.ModuleType("jax_triton"))
import triton  # before TensorFlow (README.md, "Quirks")
import torch, transformers, flax, mlstm_kernels, xlstm_jax, xlstm_eqx
from mlstm_kernels.jax.chunkwise.native import mlstm_chunkwise__native_autograd
from transformers import xLSTMForCausalLM
from xlstm_jax.trainer.llm.trainer import LLMTrainer
print("peers ready:", "torch", torch.__version__, "transformers", transformers.__version__,
      "flax", flax.__version__)
PY
