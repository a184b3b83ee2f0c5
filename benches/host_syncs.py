"""Where the host waits for the GPU: every synchronising call of a chunked prefill and of decode steps.

A call that reads a GPU tensor's value on the host (``.item()``, ``bool()``, ``.tolist()``, a copy
to the CPU, boolean-mask indexing, ...) waits until the GPU has run everything queued before it,
and the GPU then idles until the host queues more: with a model's worth of small kernels per
chunk, those waits are where a chunked prefill's host time shows. ``torch.cuda.set_sync_debug_mode``
warns at each of them; this script counts the warnings by the innermost source line of
nexusquant (else transformers, else the caller) for an 8B-shaped Llama (random bf16 weights,
``--layers`` layers) prefilling ``--tokens`` tokens in chunks through ``nexusquant_evict``, then
``--steps`` decode steps:

    python benches/host_syncs.py --tokens 16384 --layers 4 --preset balanced --chunk-size 2048 \
        --steps 8 --out DIR

Writes DIR/host_syncs.{json,md}. Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import _step, llama3_8b, run_header, write_results  # noqa: E402

import nexusquant as nq  # noqa: E402
from nexusquant.compat import output_cache  # noqa: E402


def _site() -> str:
    """The innermost frame of nexusquant's code, else of transformers', else the outermost caller's."""
    frames = traceback.extract_stack()[:-3]
    for marker in ("/nexusquant/", "/transformers/"):
        for frame in reversed(frames):
            if marker in frame.filename and "/benches/" not in frame.filename:
                name = frame.filename.split(marker)[-1]
                return f"{marker.strip('/')}/{name}:{frame.lineno} `{(frame.line or '').strip()[:90]}`"
    return "elsewhere"


class _SyncCounter:
    """Counts the sync debug mode's warnings by site while active."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def __enter__(self):
        self._show = warnings.showwarning
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():
                self.counts[_site()] += 1
            else:
                self._show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        self._catch.__exit__(*exc)
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    model = llama3_8b(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    kw = dict(quality=args.preset, chunk_size=args.chunk_size)
    with torch.no_grad(), nq.nexusquant_evict(model, **kw):
        model(ids[:, : 2 * args.chunk_size], use_cache=True, logits_to_keep=1)  # warm-up: kernels compiled
    with torch.no_grad(), nq.nexusquant_evict(model, **kw):
        with _SyncCounter() as prefill:
            out = model(ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.full((1, 1), args.tokens, dtype=torch.long, device="cuda")
        tok, _ = _step(model, cache, tok, pos)  # the first step may code the prompt's last block
        with _SyncCounter() as decode:
            for i in range(args.steps):
                tok, _ = _step(model, cache, tok, pos + 1 + i)
    chunks = -(-args.tokens // args.chunk_size)
    result = dict(
        **run_header("host_syncs.py"),
        tokens=args.tokens,
        layers=args.layers,
        chunks=chunks,
        steps=args.steps,
        preset=args.preset,
        prefill=dict(prefill.counts.most_common()),
        decode=dict(decode.counts.most_common()),
    )
    lines = [
        f"Measured on {result['device']} ({result['date']}), `{result['command']}`.",
        "",
        f"{args.tokens:,} tokens in {chunks} chunks of {args.chunk_size}, {args.layers} layers of the "
        f"Llama-3-8B shape (random bf16 weights), nexusquant `{args.preset}`: "
        f"{sum(prefill.counts.values())} host waits in the prefill "
        f"({sum(prefill.counts.values()) / (chunks * args.layers):.1f} per chunk and layer), "
        f"{sum(decode.counts.values())} in {args.steps} decode steps (the greedy token read back "
        "by the loop is not one: it stays on the GPU).",
        "",
    ]
    for phase, counts in (("prefill", prefill.counts), ("decode", decode.counts)):
        lines += [f"| {phase}: where | waits |", "|---|---|"]
        lines += [f"| {site} | {n} |" for site, n in counts.most_common()]
        lines.append("")
    md = "\n".join(lines)
    write_results(args.out, "host_syncs", result, md)


if __name__ == "__main__":
    main()
