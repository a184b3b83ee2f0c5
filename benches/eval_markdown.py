"""Print an eval.json from `nexusquant eval` as the markdown table the README carries.

Usage: ``python benches/eval_markdown.py nexusquant-eval/eval.json``

One row per method: the real prompt ratio and the ratio after the continuation (means over the
texts), the mean perplexity delta against the uncompressed run, and pass keys retrieved over all
texts' trials. Rows are grouped by the preset the eviction peers were matched to.
"""

from __future__ import annotations

import json
import sys

from nexusquant.eval.report import summary_rows


def main(path: str) -> int:
    result = json.loads(open(path, encoding="utf-8").read())
    cfg, env = result["config"], result["environment"]
    texts = ", ".join(t["name"] for t in result["texts"])
    print(
        f"{env['model']['name']} ({env['model']['dtype']}), texts {texts}, prefix {cfg['prefixes']}, "
        f"continuation {cfg['continuation']}, {cfg['retrieval_trials']} pass-key trials per text, "
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} CPU threads\n"
    )
    print("| method | ratio (prompt) | ratio (end) | PPL delta | pass keys |")
    print("|---|---|---|---|---|")
    rows = summary_rows(result)

    def group(r):
        m = r["method"]
        for p in ("high", "balanced", "max"):
            if m.endswith("@" + p) or m.startswith(f"nexusquant-{p}"):
                return (1, ("high", "balanced", "max").index(p), r["ratio"])
        return (0 if r["kind"] == "baseline" else 2, 0, r["ratio"])

    for r in sorted(rows, key=group):
        acc = f"{r['retrieval_correct']}/{r['retrieval_trials']}" if r["retrieval_trials"] else "-"
        name = (
            f"**{r['method']}**"
            if r["method"].startswith("nexusquant-") and "prerope" not in r["method"]
            else r["method"]
        )
        print(f"| {name} | {r['ratio']:.2f}x | {r['ratio_end']:.2f}x | {r['ppl_delta_pct']:+.2f}% | {acc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "nexusquant-eval/eval.json"))
