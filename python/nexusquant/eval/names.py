"""Names of ``nexusquant eval``'s methods and defaults, without torch: the CLI builds its
``--help`` from these, and ``nexusquant --help`` must not load torch (seconds, ~1 GB)."""

from __future__ import annotations

__all__ = ["FAMILIES", "ALL_METHODS", "DEFAULT_METHODS", "DEFAULT_TEXTS", "FULL_EVAL_COMMAND"]

# family key -> (label in the table and plot, kind)
FAMILIES: dict[str, tuple[str, str]] = {
    "baseline": ("uncompressed", "baseline"),
    "nexusquant": ("nexusquant", "nexusquant"),
    "nexusquant-e8": ("nexusquant, E8 presets (before December 2026)", "nexusquant"),
    "nexusquant-variant": ("nexusquant variant", "nexusquant"),
    "snapkv": ("SnapKV (evict)", "evict"),
    "expected-attention": ("ExpectedAttention (evict)", "evict"),
    "knorm": ("Knorm (evict)", "evict"),
    "streamingllm": ("StreamingLLM sinks+window (evict)", "evict"),
    "quanto": ("QuantizedCache quanto", "quantized-cache"),
    "hqq": ("QuantizedCache HQQ", "quantized-cache"),
    "int": ("plain per-token int", "int"),
}
ALL_METHODS = tuple(k for k in FAMILIES if k not in ("baseline", "nexusquant-variant"))
DEFAULT_METHODS = ("nexusquant", "snapkv", "expected-attention", "streamingllm", "int2", "int4")

DEFAULT_TEXTS = ("alice29",)
# The run behind the README's table (about 75 minutes on 2 CPU cores).
FULL_EVAL_COMMAND = (
    "nexusquant eval --text alice29 lcet10 decode.c --prefix 1024 --continuation 96 "
    "--methods all --presets high,balanced,max --retrieval-trials 7"
)
