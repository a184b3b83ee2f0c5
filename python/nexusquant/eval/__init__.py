"""``nexusquant eval``: quality against real compression, beside the methods users would pick instead.

    from nexusquant.eval import run, evaluate
    result = run()                                   # the default quick run (SmolLM2, alice29, P=512)
    result = evaluate(model, tokenizer, texts=["my.txt"], prefixes=[2048], continuation=256,
                      methods=["all"], presets=["high", "balanced", "max"], retrieval_trials=20)

See docs/EVAL.md for the method and :mod:`nexusquant.eval.peers` for how each peer is run.
"""

from .harness import DEFAULT_TEXTS, FULL_EVAL_COMMAND, corpus_texts, evaluate, load_texts, run
from .methods import ALL_METHODS, DEFAULT_METHODS, FAMILIES, Method, expand_methods
from .plotting import plot_results
from .report import format_table, summary_rows, write_json

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
