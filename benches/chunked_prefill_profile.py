"""Where a chunked prefill's time goes on the GPU (issue 14, item 2).

An 8B-shaped Llama (random bf16 weights, ``--layers`` decoder layers) prefills ``--tokens`` tokens
in chunks through ``nexusquant_evict(model, quality=..., chunk_size=...)``, once to warm up and once
timed. The nexusquant steps of every chunk are timed with CUDA synchronisation around them (so
the total is slower than an untimed run; the untimed prefill is measured first and printed beside
it), and a bf16 one-shot prefill of the same tokens is the reference:

    python benches/chunked_prefill_profile.py --tokens 131072 --layers 8 --preset balanced \
        --chunk-size 2048 --out DIR

Writes DIR/chunked_prefill_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import llama3_8b, run_header, write_results  # noqa: E402

import nexusquant as nq  # noqa: E402
import nexusquant.attention as attention  # noqa: E402
from nexusquant.cache import NexusQuantLayer  # noqa: E402

# (owner, attribute, label): the steps a chunk's forward takes through nexusquant.
STEPS = [
    (NexusQuantLayer, "materialize", "decode the compressed prefix (materialize)"),
    (NexusQuantLayer, "compress", "score and code the chunk, re-code the prompt (compress)"),
    (attention, "_lower_right_causal_attention", "attention, lower-right causal bias (flash)"),
    (attention, "_masked_attention", "attention with an explicit mask"),
    (attention, "query_importance", "the last queries' attention (scorer / fit weights)"),
]


class _Timers:
    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.saved = []
        self.depth = 0

    def __enter__(self):
        for owner, name, label in STEPS:
            real = getattr(owner, name)
            self.saved.append((owner, name, real))
            setattr(owner, name, self._wrap(real, label))
        return self

    def _wrap(self, real, label):
        def timed(*args, **kwargs):
            if self.depth:  # a step inside another (compress calls nothing listed, but be safe)
                return real(*args, **kwargs)
            self.depth += 1
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
                self.depth -= 1

        return timed

    def __exit__(self, *a):
        for owner, name, real in self.saved:
            setattr(owner, name, real)
        return False


def prefill_seconds(model, ids, **kw) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        if kw:
            with nq.nexusquant_evict(model, **kw):
                model(ids, use_cache=True, logits_to_keep=1)
        else:
            model(ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--out", default=".")
    ap.add_argument(
        "--cprofile", type=int, default=0, help="also print this many functions by cumulative time (cProfile)"
    )
    ap.add_argument(
        "--torch-profile",
        type=int,
        default=0,
        help="also print this many operators by self CPU time and by self CUDA time (torch.profiler)",
    )
    args = ap.parse_args()
    model = llama3_8b(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    kw = dict(quality=args.preset, chunk_size=args.chunk_size)
    prefill_seconds(model, ids[:, : 4 * args.chunk_size], **kw)  # warm-up: kernels compiled, plans made
    bf16 = prefill_seconds(model, ids)
    untimed = prefill_seconds(model, ids, **kw)
    with _Timers() as timers:
        timed = prefill_seconds(model, ids, **kw)
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        prefill_seconds(model, ids, **kw)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.cprofile)
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill_seconds(model, ids, **kw)
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.torch_profile))
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.torch_profile))
    rows = [
        dict(step=label, seconds=round(timers.seconds[label], 3), calls=timers.calls[label])
        for _, _, label in STEPS
        if timers.calls[label]
    ]
    rest = timed - sum(r["seconds"] for r in rows)
    result = dict(
        **run_header("chunked_prefill_profile.py"),
        tokens=args.tokens,
        layers=args.layers,
        preset=args.preset,
        chunk_size=args.chunk_size,
        bf16_one_shot_seconds=round(bf16, 3),
        chunked_seconds=round(untimed, 3),
        chunked_timed_seconds=round(timed, 3),
        steps=rows,
        rest_seconds=round(rest, 3),
    )
    lines = [
        f"Measured on {result['device']} ({result['date']}), `{result['command']}`.",
        "",
        f"{args.tokens:,} tokens, {args.layers} layers of the Llama-3-8B shape (random bf16 weights), "
        f"nexusquant `{args.preset}` in chunks of {args.chunk_size}: prefill {untimed:.1f} s "
        f"(bf16 one-shot prefill of the same tokens: {bf16:.1f} s). With every step below "
        f"synchronised and timed: {timed:.1f} s.",
        "",
        "| step | s | calls | share |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['step']} | {r['seconds']:.2f} | {r['calls']} | {r['seconds'] / timed:.0%} |")
    lines.append(f"| the rest (projections, MLP, norms, Python) | {rest:.2f} | | {rest / timed:.0%} |")
    md = "\n".join(lines) + "\n"
    write_results(args.out, "chunked_prefill_profile", result, md)


if __name__ == "__main__":
    main()
