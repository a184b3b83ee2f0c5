"""``nexusquant eval``: quality against real compression, beside the methods users would pick instead.

    from nexusquant.eval import run, evaluate
    result = run()                                   # the default quick run (SmolLM2, alice29, P=512)
    result = evaluate(model, tokenizer, texts=["my.txt"], prefixes=[2048], continuation=256,
                      methods=["all"], presets=["high", "balanced", "max"], retrieval_trials=20)

See docs/EVAL.md for the method and :mod:`nexusquant.eval.peers` for how each peer is run.
"""

import importlib

from .names import ALL_METHODS, DEFAULT_METHODS, DEFAULT_TEXTS, FAMILIES, FULL_EVAL_COMMAND

__all__ = [
    "evaluate",
    "run",
    "load_texts",
    "corpus_texts",
    "format_table",
    "summary_rows",
    "write_json",
    "plot_results",
    "expand_methods",
    "Method",
    "FAMILIES",
    "ALL_METHODS",
    "DEFAULT_METHODS",
    "DEFAULT_TEXTS",
    "FULL_EVAL_COMMAND",
]

# The rest needs torch and loads on first use, so that the CLI's --help (which imports .names) stays
# free of torch.
_LAZY = {
    "evaluate": "harness",
    "run": "harness",
    "load_texts": "harness",
    "corpus_texts": "harness",
    "format_table": "report",
    "summary_rows": "report",
    "write_json": "report",
    "plot_results": "plotting",
    "expand_methods": "methods",
    "Method": "methods",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nexusquant.eval' has no attribute {name!r}")
