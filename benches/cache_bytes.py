"""Where a compressed cache's bytes go, by part, for each preset (or knob set) after one prefill.

Usage: ``python benches/cache_bytes.py [--model smollm2] [--text alice29] [--prefix 1024,4096]
[--out DIR] [SPEC ...]`` where each SPEC is a preset name or ``preset:knob=v,...`` as ``nexusquant
eval --variant`` takes it (default: high balanced max). Prints a table per prefix and writes
``cache_bytes.{json,md}`` to ``--out``.

The parts add up to ``nexusquant.compression_stats(cache)["nbytes"]`` (checked): value codes and
scales, value refinements, key bases (the transform coder's int8 synthesis vectors), the rest of
the transform-coded keys (codes, means, steps, widths), E8 key codes and scales, the sinks and the
window in the model's dtype, positions, validity masks, centres, rotary tables.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

import nexusquant as nq
from nexusquant.cache import LAYER_TENSOR_FIELDS
from nexusquant.eval.harness import load_texts
from nexusquant.eval.methods import parse_variant
from nexusquant.eval.models import load_model
from nexusquant.tiers import TransformCodedKeys


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _layer_field_part(name: str) -> str:
    if name in ("sink_k", "sink_v"):
        return "sinks (full precision)"
    if name in ("win_k", "win_v"):
        return "window (full precision)"
    if name in ("k_center", "v_center"):
        return "centres"
    return "positions and masks"


def breakdown(cache) -> Counter:
    parts: Counter = Counter()
    for layer in cache.layers:
        for name in LAYER_TENSOR_FIELDS:
            parts[_layer_field_part(name)] += _nbytes(getattr(layer, name))
        for tier in layer.tiers.values():
            keys = tier.keys
            if isinstance(keys, TransformCodedKeys):
                for row in keys.rows:
                    parts["key bases"] += _nbytes(row[0].basis)
                    parts["key codes and side info"] += sum(c.nbytes() for c in row) - _nbytes(row[0].basis)
            else:
                parts["key codes (E8)"] += _nbytes(keys.codes) + _nbytes(keys.raw)
                parts["key scales (E8)"] += _nbytes(keys.scales)
            values = tier.values
            parts["value codes"] += _nbytes(values.codes) + _nbytes(values.raw)
            parts["value scales"] += _nbytes(values.scales)
            parts["value refinements"] += sum(_nbytes(t) for t in (values.ref_idx, values.ref_codes, values.ref_scales))
            parts["positions and masks"] += _nbytes(tier.positions_held) + _nbytes(tier.valid)
    parts["rotary tables"] += sum(t.nbytes() for t in getattr(cache, "rope_tables", {}).values())
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=["high", "balanced", "max"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="alice29")
    ap.add_argument("--prefix", default="1024,4096")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="bfloat16")
    ids_all = load_texts([args.text], tokenizer)[0].ids
    rows = []
    for prefix in (int(p) for p in args.prefix.split(",")):
        ids = torch.tensor([ids_all[:prefix]])
        for spec in args.specs:
            method = parse_variant(spec if ":" in spec or "=" in spec else {"preset": spec})
            with nq.nexusquant_evict(model, quality=method.preset, **method.knobs) as session, torch.no_grad():
                model(ids, use_cache=True)
                stats = session.stats()
                parts = breakdown(session.cache)
            total = sum(parts.values())
            assert total == stats["nbytes"], f"parts {total} != nbytes {stats['nbytes']}"
            rows.append(dict(prefix=prefix, spec=spec, ratio=stats["ratio"], nbytes=total, parts=dict(parts)))
            print(f"{prefix} {spec}: {stats['ratio']:.2f}x, {total:,} bytes", flush=True)
    names = sorted({p for r in rows for p in r["parts"]}, key=lambda p: -sum(r["parts"].get(p, 0) for r in rows))
    names = [p for p in names if any(r["parts"].get(p) for r in rows)]
    lines = [
        f"`python benches/cache_bytes.py --model {args.model} --text {args.text} --prefix {args.prefix} "
        f"{' '.join(args.specs)}`: share of the cache's bytes after one prefill (bf16).",
        "",
        "| prefix | setting | ratio | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = [f"{100 * r['parts'].get(p, 0) / r['nbytes']:.1f}%" for p in names]
        lines.append(f"| {r['prefix']} | {r['spec']} | {r['ratio']:.2f}x | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cache_bytes.json").write_text(json.dumps(dict(model=args.model, text=args.text, rows=rows), indent=2))
        (out / "cache_bytes.md").write_text(md)


if __name__ == "__main__":
    main()
