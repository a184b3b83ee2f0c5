"""nexusquant: compress a transformers model's KV cache after prefill.

    from nexusquant import nexusquant_evict
    with nexusquant_evict(model, quality="balanced"):
        out = model.generate(input_ids, max_new_tokens=512)

The byte-level core (E8 codes, Hadamard rotation, delta and entropy coding, the .nqkv format) is
Rust (`nexusquant._core`); the transformers integration, presets and evaluation are Python. The
torch-dependent parts load on first use, so `import nexusquant` works without torch.
"""

from ._core import NexusQuantError, __version__
from .codec import E8Codec, E8Encoded, e8_nearest

__all__ = [
    "NexusQuantError",
    "E8Codec",
    "E8Encoded",
    "e8_nearest",
    "__version__",
    "nexusquant_evict",
    "NexusQuantCache",
    "CompressionSettings",
    "PRESETS",
    "compression_stats",
    "save_cache",
    "load_cache",
    "inspect_file",
]

_LAZY = {
    "nexusquant_evict": ("evict", "nexusquant_evict"),
    "NexusQuantCache": ("cache", "NexusQuantCache"),
    "compression_stats": ("cache", "compression_stats"),
    "CompressionSettings": ("presets", "CompressionSettings"),
    "PRESETS": ("presets", "PRESETS"),
    "save_cache": ("files", "save_cache"),
    "load_cache": ("files", "load_cache"),
    "inspect_file": ("files", "inspect_file"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        if mod in ("cache", "files"):
            importlib.import_module(".attention", __name__)  # registers the "nexusquant" attention
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nexusquant' has no attribute {name!r}")
