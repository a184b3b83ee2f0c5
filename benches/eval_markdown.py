"""Print eval.json files from `nexusquant eval` as the markdown table the README carries.

Usage: ``python benches/eval_markdown.py nexusquant-eval/eval.json [more.json ...]``

One row per method: the real prompt ratio and the ratio after the continuation (means over the
texts), the mean perplexity delta against the uncompressed run, and pass keys retrieved over all
texts' trials. Rows are grouped by the preset the eviction peers were matched to. Several files of
the same texts and prefix (runs split to fit a machine) are merged; their uncompressed runs must
agree, or the merge is refused. nexusquant rows are named by the key coder they ran with, so a row
reads the same whoever's presets produced it.
"""

from __future__ import annotations

import json
import sys

from nexusquant.eval.report import summary_rows


def coder_name(settings: dict) -> str:
    """``pca 1.5b pre-RoPE, evict 0.3`` or ``E8 3b post-RoPE, evict 0``: what a nexusquant row ran."""
    if settings.get("key_codec") == "pca":
        keys = f"pca {settings['key_rate']}b/elem {settings['key_domain'].replace('_rope', '-RoPE')}"
    else:
        keys = f"E8 {settings['key_bits']}b {settings['key_domain'].replace('_rope', '-RoPE')}"
    values, evict, window = settings["value_bits"], settings["evict"], settings["recent_window"]
    chunks = f", prefill in chunks of {settings['chunk_size']}" if settings.get("chunk_size") else ""
    return f"{keys} keys, {values}b values, evict {evict}, window {window}{chunks}"


def main(paths: list[str]) -> int:
    results = [json.loads(open(p, encoding="utf-8").read()) for p in paths]
    first = results[0]
    cfg, env = first["config"], first["environment"]
    base = {(b["text"], b["prefix"]): b["ppl"] for b in first["baselines"]}
    merged = dict(first, results=list(first["results"]))
    for other in results[1:]:
        for b in other["baselines"]:
            if abs(base[(b["text"], b["prefix"])] - b["ppl"]) > 1e-9 * b["ppl"]:
                raise SystemExit(f"uncompressed runs differ for {b['text']} P={b['prefix']}: not the same inputs")
        merged["results"] += [r for r in other["results"] if r["kind"] != "baseline"]
    settings = {}
    for r in merged["results"]:
        settings.setdefault(r["method"], r.get("settings") or {})
    texts = ", ".join(t["name"] for t in first["texts"])
    print(
        f"{env['model']['name']} ({env['model']['dtype']}), texts {texts}, prefix {cfg['prefixes']}, "
        f"continuation {cfg['continuation']}, {cfg['retrieval_trials']} pass-key trials per text, "
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} CPU threads\n"
    )
    print("| method | ratio (prompt) | ratio (end) | PPL delta | pass keys |")
    print("|---|---|---|---|---|")
    rows = summary_rows(merged)

    def order(r: dict) -> tuple:
        kind = {"baseline": 0, "nexusquant": 1}.get(r["kind"], 2)
        return (kind, r["ratio"])

    for r in sorted(rows, key=order):
        acc = f"{r['retrieval_correct']}/{r['retrieval_trials']}" if r["retrieval_trials"] else "-"
        name = r["method"]
        if r["kind"] == "nexusquant" and settings.get(name):
            name = f"nexusquant: {coder_name(settings[name])}"
        print(f"| {name} | {r['ratio']:.2f}x | {r['ratio_end']:.2f}x | {r['ppl_delta_pct']:+.2f}% | {acc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["nexusquant-eval/eval.json"]))
