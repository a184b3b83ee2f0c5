"""What ``recode_prompt`` costs in memory while a chunked prefill runs.

Usage: ``python benches/staged_bytes.py [--model smollm2] [--tokens 4096] [--chunk 1024]
[--text alice29] [--presets balanced,max] [--out staged_bytes.json]``

Prefills the first ``--tokens`` tokens of a packaged text through ``nexusquant_evict(model,
quality=preset, chunk_size=--chunk)`` (the path users take), once with ``recode_prompt=True``
(chunks staged at the staging rates, the prompt coded again at its end) and once with False (each
chunk at the preset's rates), and counts the bytes the cache holds before every chunk and after
the last one: all of them, and the codes alone (the tiers; not the sinks, the window or the
chunk held exact for the next one). Prints, per preset, the bytes before the last chunk (the
most staged) and at the end for both, and their ratio: what staging costs at its peak, measured
against not staging in the same run.
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import torch
from transformers import DynamicCache

import nexusquant as nq
import nexusquant.evict as evict_module
from nexusquant.compat import cache_kwarg
from nexusquant.eval.harness import corpus_texts
from nexusquant.eval.models import load_model


def bytes_per_chunk(model, ids, preset, chunk, recode):
    """The cache's bytes before each chunk and after the last, and its final real ratio."""
    cache = DynamicCache(config=model.config)  # its layers become nexusquant's in place
    seen = []
    run_chunks = evict_module.forward_in_chunks

    def counting(forward, kwargs, chunk_size, cache_name, before_chunk=None, **kw):
        def before(part_ids):
            layers = [layer for layer in cache.layers if hasattr(layer, "tiers")]
            # All the cache holds, and the codes alone (the tiers: no sinks, window, held chunk).
            total = sum(layer.nbytes() for layer in layers)
            seen.append((total, sum(t.nbytes() for layer in layers for t in layer.tiers.values())))
            if before_chunk is not None:
                before_chunk(part_ids)

        return run_chunks(forward, kwargs, chunk_size, cache_name, before_chunk=before, **kw)

    with torch.no_grad(), mock.patch.object(evict_module, "forward_in_chunks", counting):
        with nq.nexusquant_evict(model, quality=preset, chunk_size=chunk, recode_prompt=recode):
            model(ids, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    stats = nq.compression_stats(cache)
    codes = sum(t.nbytes() for layer in cache.layers if hasattr(layer, "tiers") for t in layer.tiers.values())
    return seen + [(stats["nbytes"], codes)], stats["ratio"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--text", default="alice29")
    ap.add_argument("--presets", default="balanced,max")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model, dtype="bfloat16")
    body = corpus_texts()[args.text].read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor([tok(body, add_special_tokens=False).input_ids[: args.tokens]])
    rows = []
    print(f"{args.model}, {ids.shape[1]} tokens of {args.text}, chunks of {args.chunk}: bytes the cache holds")
    print("(all of it / the codes alone, before the last chunk and at the end)")
    print(f"{'preset':10} {'recode':>6} {'before last chunk':>26} {'end':>26} {'end ratio':>9}")
    for preset in args.presets.split(","):
        out = {}
        for recode in (True, False):
            seen, ratio = bytes_per_chunk(model, ids, preset, args.chunk, recode)
            out[recode] = seen
            rows.append({"preset": preset, "recode_prompt": recode, "bytes": seen, "ratio": ratio})
            before, end = seen[-2], seen[-1]
            print(
                f"{preset:10} {str(recode):>6} {before[0]:>13,} /{before[1]:>11,} "
                f"{end[0]:>13,} /{end[1]:>11,} {ratio:>8.2f}x"
            )
        staged, plain = out[True][-2], out[False][-2]
        print(
            f"{preset:10} staged / not staged before the last chunk: {staged[0] / plain[0]:.2f}x "
            f"(codes alone {staged[1] / plain[1]:.2f}x); at the end: {out[True][-1][0] / out[False][-1][0]:.2f}x"
        )
    if args.out:
        with open(args.out, "w") as f:
            run = {"model": args.model, "tokens": int(ids.shape[1]), "chunk": args.chunk, "text": args.text}
            json.dump({**run, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
