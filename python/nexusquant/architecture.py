"""What nexusquant reads off a transformers model: which family it is and whether that is
supported, its attention modules, each layer's sliding window, and the fingerprint a saved cache
must match. A leaf of the package: it looks at configs and modules and changes nothing.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import torch
import transformers

from ._core import NexusQuantError

__all__ = ["SUPPORTED_MODEL_TYPES", "attention_modules", "check_supported", "layer_plan", "model_fingerprint"]

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt_neox",
    "gptj",
)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention modules: those with a ``layer_idx`` and key/value projections."""
    found = []
    for m in model.modules():
        if getattr(m, "layer_idx", None) is None:
            continue
        has_kv = any(hasattr(m, n) for n in ("k_proj", "qkv_proj", "query_key_value", "kv_proj"))
        if has_kv and type(m).__name__.endswith("Attention"):
            found.append(m)
    return found


def layer_plan(config: Any) -> list[Optional[int]]:
    """Per decoder layer, its sliding window (None for full attention), from a model config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise NexusQuantError(f"{type(config).__name__} has no num_hidden_layers: not a supported decoder model")
    layer_types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if layer_types is None:
        use = getattr(text, "use_sliding_window", True)
        return [window if (window is not None and use) else None] * n
    plan: list[Optional[int]] = []
    for t in layer_types:
        if t in ("sliding_attention", "chunked_attention"):
            plan.append(window if t == "sliding_attention" else getattr(text, "attention_chunk_size", window))
        elif t == "full_attention":
            plan.append(None)
        else:
            raise NexusQuantError(f"layer type {t!r} is not supported by nexusquant (only full and sliding attention)")
    return plan


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What a saved cache must match: architecture, layer and head shapes, rotary parameters."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    rope = {}
    for name in (
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "partial_rotary_factor",
        "rotary_pct",
        "rotary_dim",
        "rotary_emb_base",
        "max_position_embeddings",
    ):
        value = getattr(text, name, None)
        if value is not None:
            rope[name] = value
    return {
        "model_type": getattr(text, "model_type", None),
        "architectures": getattr(config, "architectures", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None),
        "hidden_size": hidden,
        "vocab_size": getattr(text, "vocab_size", None),
        "sliding_windows": layer_plan(config),
        "rope": json.loads(json.dumps(rope, default=str)),
    }


def check_supported(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules, or NexusQuantError naming what is missing."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise NexusQuantError(f"{type(model).__name__} has no .config: pass a transformers model")
    text = cfg.get_text_config(decoder=True)
    mtype = getattr(text, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise NexusQuantError(f"model type {mtype!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    mods = attention_modules(model)
    if not mods:
        raise NexusQuantError(f"{type(model).__name__} has no attention modules with a layer_idx: cannot attach")
    source = sys.modules.get(type(mods[0]).__module__)
    if source is None or not hasattr(source, "ALL_ATTENTION_FUNCTIONS"):
        raise NexusQuantError(
            f"{type(mods[0]).__name__} in transformers {transformers.__version__} does not dispatch attention "
            "through transformers' AttentionInterface, which nexusquant needs: upgrade transformers"
        )
    layer_plan(cfg)
    return mods
