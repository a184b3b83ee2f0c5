"""Rotary tables held as positions: are the recomputed angles the model's, and what do they save?

Usage: ``python benches/rope_table_bytes.py [--model smollm2] [--tokens 1024] [--text alice29]``

Prefills the first ``--tokens`` tokens of a packaged text with ``quality="high"`` (pre-RoPE
transform-coded keys), records the (cos, sin) the model passed to each attention module, and
prints, per rotary table, whether the table holds positions and how many recomputed angles differ
from the model's; then the cache's ratio, and the ratio the same cache has when the tables hold
angle rows instead (the recorder's frequencies hidden, as before December 2026).
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

import nexusquant as nq
from nexusquant.architecture import attention_modules
from nexusquant.compat import output_cache
from nexusquant.eval.harness import corpus_texts
from nexusquant.eval.models import load_model


def prefill(model, ids):
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault(module.layer_idx, (kwargs["position_embeddings"], kwargs.get("position_ids")))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        with torch.no_grad(), nq.nexusquant_evict(model, quality="high"):
            out = model(ids, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return output_cache(out), seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--text", default="alice29")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model, "bfloat16")
    text = open(corpus_texts()[args.text], encoding="utf-8", errors="replace").read()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    cache, seen = prefill(model, ids)
    for key, table in sorted(cache.rope_tables.items()):
        layer = next(i for i, lay in enumerate(cache.layers) if lay.rope_key == key)
        (cos, sin), pos = seen[layer]
        if table.formula is None:
            print(f"table {key}: rows, {table.nbytes()} bytes")
            continue
        c, s = table.formula.angles(pos)
        differ = int((c != cos).sum() + (s != sin).sum())
        print(f"table {key}: positions, {table.nbytes()} bytes; {differ} of {2 * cos.numel()} recomputed values differ")
    stats = nq.compression_stats(cache)
    with mock.patch("nexusquant.rope.rotary_sources", lambda model: []):
        rows, _ = prefill(model, ids)
    before = nq.compression_stats(rows)
    print(
        f"{args.model}, {ids.shape[1]} tokens of {args.text}, quality='high': ratio {stats['ratio']:.3f} "
        f"(tables {stats['rope_nbytes']} bytes) against {before['ratio']:.3f} with angle rows "
        f"(tables {before['rope_nbytes']} bytes)"
    )


if __name__ == "__main__":
    main()
