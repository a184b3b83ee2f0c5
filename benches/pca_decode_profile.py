"""Where a decode step over transform-coded keys spends its time (torch profiler, H200 8B shape).

The fair bench's setting (8 layers of the Llama-3-8B shape, random bf16 weights, 32K tokens of
chunked prefill, batch 1, ``key_codec=pca``), then ``--steps`` profiled decode steps: prints the
top operators by CUDA time and by CPU time. ``python benches/pca_decode_profile.py --out DIR``
writes ``pca_decode_profile.txt`` there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from gpu_bench import _step, llama3_8b

import nexusquant as nq
from nexusquant.compat import output_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--knobs", default="key_codec=pca,key_domain=pre_rope,key_rate=3.5,value_bits=4")
    ap.add_argument("--quality", default="high", help="the preset the knobs apply to")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from nexusquant.eval.methods import parse_variant

    knobs = parse_variant(args.knobs).knobs if args.knobs else {}
    model = llama3_8b(8)
    ids = torch.randint(0, 128000, (1, args.context), device="cuda")
    with nq.nexusquant_evict(model, quality=args.quality, chunk_size=2048, **knobs), torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.full((1, 1), args.context, dtype=torch.long, device="cuda")
        for _ in range(4):
            tok, _ = _step(model, cache, tok, pos)
            pos = pos + 1
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            tok, _ = _step(model, cache, tok, pos)
            pos = pos + 1
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / args.steps * 1e3
        timing = f"{args.quality} {knobs}: {per_step:.2f} ms per decode step (mean of {args.steps}, unprofiled)\n"
        print(timing, flush=True)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                tok, _ = _step(model, cache, tok, pos)
                pos = pos + 1
            torch.cuda.synchronize()
    text = timing + (
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        + "\n"
        + prof.key_averages(group_by_stack_n=0).table(sort_by="cpu_time_total", row_limit=30)
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pca_decode_profile.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
