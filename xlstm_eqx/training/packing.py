"""Packed fine-tuning examples must not see each other: the model settings that make it so."""

from typing import Any

from ..models import ModelConfig, family_of


# The switches, wherever they sit in a model config: the mLSTM memory reset (xLSTM) and the
# same-document attention mask (Llama).
ISOLATION_FIELDS = ("reset_at_document_boundaries", "mask_across_document_boundaries")


def _switch_on(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: True if k in ISOLATION_FIELDS else _switch_on(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_switch_on(v) for v in tree]
    return tree


def isolate_documents(model_config: ModelConfig) -> ModelConfig:
    """`model_config` with every document-isolation switch on (no parameter changes), so packed
    examples (`--data-format sft`) never see each other; a ValueError for a model that cannot
    isolate them (sLSTM blocks keep their memory across a document border)."""
    d = model_config.to_dict()
    if d.get("slstm_at"):
        raise ValueError(
            "--data-format sft packs several examples per sequence, separated by document "
            "borders, but this model has sLSTM blocks (slstm_at), which have no memory reset "
            "at a border; use a model without sLSTM blocks"
        )
    if not any(k in ISOLATION_FIELDS for k in _keys(d)):
        raise ValueError(
            f"--data-format sft: the model family {family_of(model_config).name!r} has no "
            "document-isolation setting, so packed examples would see each other"
        )
    return family_of(model_config).config_from_dict(_switch_on(d))


def _keys(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [k for k, v in tree.items() for k in [k, *_keys(v)]]
    if isinstance(tree, list):
        return [k for v in tree for k in _keys(v)]
    return []
