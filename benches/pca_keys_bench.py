"""Kernel-level timing of one transform-coded layer's decode pieces on the GPU (8B shape).

One batch row, ``--tokens`` keys of 8 KV heads x 128 (F = 1024) with a decaying spectrum, coded at
``--rate`` bits per element; times (CUDA events, median of ``--reps``):

- ``rebuild (kernel + GEMM)``: :func:`nexusquant.gpu.transform_keys` (unpack kernel, fp16 GEMM);
- ``rebuild (float32 torch)``: :meth:`KeyTransformCode.decode` on the same CUDA tensors (the path
  before the kernel);
- ``RoPE redo (torch)``: the model's rotation of those keys with gathered angles;
- ``place + RoPE into float32 (kernel)``: :func:`nexusquant.gpu.place_keys`, what decode uses;
- ``E8 value decode``: the layer's 4-bit values;
- ``SDPA, bf16 K/V``: flash decode of one query (32 heads) over bf16 keys and values of that length;
- ``fused decode attention``: :func:`nexusquant.gpu.pca_decode_attention`: the coefficients
  unpacked once per token (``nq_pca_coeffs_f16``), then one launch that rebuilds, rotates (angles
  from positions) and scores the keys on chip and accumulates the E8 values, over the coded tokens
  and an 8-token bf16 window; checked against float32 torch; ``first version``: the kernel that
  unpacks the codes itself in every KV head's block (``NEXUSQUANT_PCA_STAGE=0``);
- ``rebuild path total``: what ``attention._decode_rebuilt`` runs for such a layer (rebuild, place
  with angles from positions, E8 values, float32 torch attention over the rebuilt keys; the
  window's few tokens and the merge left out).

``--sweep 1024,4096,...`` also times the fused kernel and the rebuild path total at those token
counts (the first rows of the same code): the crossover ``attention._FUSED_MAX_TOKENS`` encodes.

``python benches/pca_keys_bench.py --out DIR`` writes ``pca_keys_bench.{json,md}`` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import nexusquant as nq
from nexusquant import gpu
from nexusquant.gpu import pca_attention
from nexusquant.gpu.transform import transform_coeffs
from nexusquant.tiers import QuantizedTensor
from nexusquant.transform import fit_key_transform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import write_results  # noqa: E402


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--rate", type=float, default=3.5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    hkv, d, t = 8, 128, args.tokens
    f = hkv * d
    torch.manual_seed(0)
    mix = torch.randn(f, f, device=dev) / f**0.5 * torch.logspace(0.5, -1.5, f, device=dev)[None, :]
    x = torch.randn(t, f, device=dev) @ mix.T
    code = fit_key_transform(x, args.rate)
    center = torch.randn(f, device=dev) * 0.1
    ref = code.decode() + center
    got = gpu.transform_keys(code, center)
    err = float((got.float() - ref).norm() / ref.norm())
    keys = got.reshape(1, t, hkv, d).permute(0, 2, 1, 3).to(torch.bfloat16)
    angles = torch.arange(t, device=dev)[:, None] * (10000 ** (-torch.arange(0, d, 2, device=dev) / d))[None, :]
    cos_t = torch.cat([angles.cos(), angles.cos()], -1).to(torch.bfloat16)
    sin_t = torch.cat([angles.sin(), angles.sin()], -1).to(torch.bfloat16)
    seq = torch.arange(t, device=dev, dtype=torch.int32).expand(1, hkv, t)
    placed = torch.empty(hkv, t, d, device=dev)
    cos_f, sin_f = angles.cos().float()[None].contiguous(), angles.sin().float()[None].contiguous()
    gpu.place_keys(got, hkv, placed, (cos_f[0], sin_f[0], d), seq[0, 0].contiguous())
    want = got.float().reshape(t, hkv, d).permute(1, 0, 2)
    full_cos, full_sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want = want * full_cos + rotate_half(want) * full_sin
    place_err = float((placed - want).norm() / want.norm())

    def rope():
        idx = seq.long()
        c, s = cos_t[idx], sin_t[idx]
        return keys * c + rotate_half(keys) * s

    values = QuantizedTensor(d, 4, 0, torch.bfloat16)
    values.append(torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16))
    q = torch.randn(1, 32, 1, d, device=dev, dtype=torch.bfloat16)
    kf = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16)
    vf = torch.randn_like(kf)
    # The fused kernel: one query (32 heads, GQA 4) over the coded tokens (RoPE from positions) and
    # an 8-token window, against float32 torch on the float32-decoded keys.
    win_k = torch.randn(1, hkv, 8, d, device=dev, dtype=torch.bfloat16)
    win_v = torch.randn_like(win_k)
    win_valid = torch.ones(1, 8, dtype=torch.bool, device=dev)
    inv_freq = (10000 ** (-torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)).contiguous()
    positions = torch.arange(t, device=dev, dtype=torch.int32)[None].contiguous()
    seq1 = positions.clone()
    rope_arg = ("positions", positions, inv_freq, 1.0, torch.bfloat16)
    center_b = center[None].contiguous()

    def fused():
        return gpu.pca_decode_attention(
            q, win_k, win_v, 0, None, win_valid, [code], center_b, values, None, seq1, rope_arg, None, d**-0.5
        )

    pca_attention.STAGED = False
    out_v1 = fused()
    pca_attention.STAGED = True
    out = fused()
    assert out is not None and out_v1 is not None, "the fused kernel does not apply"
    fr = positions[0].float()[:, None] * inv_freq[None, :]
    fc = torch.cat([fr.cos(), fr.cos()], -1).to(torch.bfloat16).float()
    fs = torch.cat([fr.sin(), fr.sin()], -1).to(torch.bfloat16).float()
    kr = ref.reshape(t, hkv, d).permute(1, 0, 2)
    kr = kr * fc + rotate_half(kr) * fs
    k_all = torch.cat([kr[None], win_k.float()], 2)
    v_all = torch.cat([values.dequantize().float(), win_v.float()], 2)
    want_o = F.scaled_dot_product_attention(q.float(), k_all, v_all, enable_gqa=True, scale=d**-0.5)
    fused_err = float((out.float().transpose(1, 2) - want_o).norm() / want_o.norm())
    fused_v1_err = float((out_v1.float().transpose(1, 2) - want_o).norm() / want_o.norm())
    pos_arg = (positions[0], inv_freq, 1.0, torch.bfloat16)
    gpu.place_keys(got, hkv, placed, seq=seq1[0], positions=pos_arg)
    want_p = got.float().reshape(t, hkv, d).permute(1, 0, 2)
    want_p = want_p * fc + rotate_half(want_p) * fs
    place_pos_err = float((placed - want_p).norm() / want_p.norm())

    def rebuild_path(code_, values_, placed_, seq_):
        flat = gpu.transform_keys(code_, center)
        gpu.place_keys(flat, hkv, placed_, seq=seq_, positions=pos_arg)
        v = values_.dequantize().float()
        qg = q.reshape(1, hkv, 4, d).float() * d**-0.5
        s = torch.matmul(qg, placed_[None].transpose(-1, -2))
        m = s.amax(-1)
        p = torch.exp(s - m[..., None])
        return torch.matmul(p, v) / p.sum(-1)[..., None]

    def timed_fused(staged):
        def run():
            pca_attention.STAGED = staged
            return fused()

        return run

    rows = {
        "rebuild (kernel + GEMM)": median_ms(lambda: gpu.transform_keys(code, center), args.reps),
        "rebuild (float32 torch)": median_ms(lambda: code.decode() + center, args.reps),
        "RoPE redo (torch)": median_ms(rope, args.reps),
        "place + RoPE into float32 (kernel)": median_ms(
            lambda: gpu.place_keys(got, hkv, placed, (cos_f, sin_f, d), seq[0, 0]), args.reps
        ),
        "E8 value decode": median_ms(values.dequantize, args.reps),
        "SDPA, bf16 K/V (flash, GQA)": median_ms(
            lambda: F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True), args.reps
        ),
        "place + RoPE from positions (kernel)": median_ms(
            lambda: gpu.place_keys(got, hkv, placed, seq=seq1[0], positions=pos_arg), args.reps
        ),
        "rebuild path total (rebuild + place + values + torch attention)": median_ms(
            lambda: rebuild_path(code, values, placed, seq1[0]), args.reps
        ),
        "fused, first version (codes unpacked in every head's block)": median_ms(timed_fused(False), args.reps),
        "coefficients pre-pass (nq_pca_coeffs_f16)": median_ms(
            lambda: transform_coeffs(code, -(-code.basis.shape[1] // 64) * 64), args.reps
        ),
        "fused decode attention (pre-pass + one launch, keys on chip)": median_ms(timed_fused(True), args.reps),
    }
    pca_attention.STAGED = True
    sweep = []
    for n in [int(x) for x in args.sweep.split(",") if x]:
        if n > t:
            continue
        code_n = dataclasses.replace(code, codes=code.codes[:n].contiguous())
        vals_n = QuantizedTensor(d, 4, 0, torch.bfloat16)
        vals_n.append(torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16))
        placed_n = torch.empty(hkv, n, d, device=dev)

        seq_n = seq1[:, :n].contiguous()

        def fused_n(code_n=code_n, vals_n=vals_n, seq_n=seq_n):
            return gpu.pca_decode_attention(
                q, win_k, win_v, 0, None, win_valid, [code_n], center_b, vals_n, None, seq_n, rope_arg, None, d**-0.5
            )

        def rebuild_n(code_n=code_n, vals_n=vals_n, placed_n=placed_n, seq_n=seq_n):
            return rebuild_path(code_n, vals_n, placed_n, seq_n[0])

        row = dict(tokens=n, fused_ms=median_ms(fused_n, args.reps), rebuild_path_ms=median_ms(rebuild_n, args.reps))
        sweep.append(row)
        print(row, flush=True)
    result = dict(
        device=torch.cuda.get_device_name(0),
        tokens=t,
        kv_heads=hkv,
        head_dim=d,
        rate=args.rate,
        components=int(code.bits.numel()),
        code_bytes=int(code.codes.shape[1]),
        rebuild_rel_error=err,
        place_rel_error=place_err,
        fused_rel_error=fused_err,
        fused_first_version_rel_error=fused_v1_err,
        place_positions_rel_error=place_pos_err,
        sweep=sweep,
        nexusquant=nq.__version__,
        ms=rows,
    )
    md = [
        f"{result['device']}, {t} tokens, {hkv} KV heads x {d}, {args.rate} b/elem: "
        f"{result['components']} components, {result['code_bytes']} code bytes per token; "
        f"rebuild rel. error against float32 {err:.1e}, placement + RoPE {place_err:.1e}, "
        f"fused attention output {fused_err:.1e} (first version {fused_v1_err:.1e}), placement with angles "
        f"from positions {place_pos_err:.1e}.",
        "",
        "| piece (one layer, batch 1) | ms |",
        "|---|---|",
    ] + [f"| {k} | {v:.3f} |" for k, v in rows.items()]
    if sweep:
        md += ["", "| tokens | fused ms | rebuild path ms |", "|---|---|---|"]
        md += [f"| {r['tokens']} | {r['fused_ms']:.3f} | {r['rebuild_path_ms']:.3f} |" for r in sweep]
    write_results(args.out, "pca_keys_bench", result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
