"""GPU measurements of nexusquant: one script that checks and times everything in one call.

    python benches/gpu_bench.py --out DIR [--phase kernels|e2e|all]

kernels: device-to-device copy bandwidth (bytes read + written), then quantize and dequantize of a
    Llama-3-8B-shaped KV block (fp16 in/out) against it; decode attention over the compressed
    cache (the real nexusquant path: fused kernel + full-precision window) against PyTorch SDPA on
    fp16 K/V, Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128) at 8K, 32K and 128K
    tokens, batch 1 and 8. Every timed variant is first checked against the CPU reference.
e2e: a Llama-3-8B-shaped model with random bf16 weights; prefill 32K and 128K tokens, then generate
    128 tokens, with and without nexusquant: peak torch.cuda.max_memory_allocated, KV bytes, prefill
    time (the difference is the time to compress), decode tokens/s; and the longest context that
    fits, extrapolated from the measured peak memory per token.

Writes gpu_bench.json and gpu_bench.md (tables) under --out and prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nexusquant as nq
from nexusquant import gpu
from nexusquant.codec import as_codec_input
from nexusquant.presets import resolve_settings


def timed(fn, reps=20, warmup=3):
    """Median milliseconds of ``fn`` with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_timed(fn, reps=20):
    """Median milliseconds of one ``fn`` with the host taken out: ``reps`` calls captured in a CUDA
    graph, the graph replayed. None if ``fn`` cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for _ in range(reps):
                fn()
        return timed(graph.replay, reps=10, warmup=2) / reps
    except Exception as e:  # report, do not fail the run
        print(f"graph capture failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.synchronize()
        return None


def copy_bandwidth():
    x = torch.randn(1 << 30, device="cuda", dtype=torch.float16)  # 2 GiB
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms / 1e3) / 1e9  # GB/s, read + write


def bench_codec(copy_gbs, results):
    rows = []
    n = 8 * 32768 * 8  # vectors: 8 KV heads x 32K tokens x 8 layers of Llama-3-8B
    x = torch.randn(n, 128, device="cuda", dtype=torch.float16)
    for bits in (1, 2, 3, 4):
        codec = nq.E8Codec(128, bits, 0)
        # Correct first: a sample against the Rust encoder.
        sample = x[:20000]
        c, s = gpu.encode(codec, sample)
        rc, rs = codec.encode_arrays(*as_codec_input(sample.cpu()))
        mismatched = int((c.cpu().numpy() != rc).any(axis=1).sum() + (s.cpu().numpy().view(np.uint16) != rs).sum())
        codes, scales = gpu.encode(codec, x)
        # Default arguments bind this iteration's values (each lambda is called only inside timed()).
        q_ms = timed(lambda codec=codec: gpu.encode(codec, x), reps=10)
        d_ms = timed(
            lambda codec=codec, codes=codes, scales=scales: gpu.decode(codec, codes, scales, torch.float16), reps=10
        )
        in_bytes = x.numel() * 2
        code_bytes = codes.numel() + scales.numel() * 2
        q_gbs = (in_bytes + code_bytes) / (q_ms / 1e3) / 1e9
        d_gbs = (in_bytes + code_bytes) / (d_ms / 1e3) / 1e9
        rows.append(
            dict(
                bits=bits,
                vectors=n,
                quantize_ms=q_ms,
                quantize_GBps=q_gbs,
                quantize_vs_copy=q_gbs / copy_gbs,
                dequantize_ms=d_ms,
                dequantize_GBps=d_gbs,
                dequantize_vs_copy=d_gbs / copy_gbs,
                codes_differing_from_cpu=mismatched,
            )
        )
        print(rows[-1], flush=True)
    results["codec"] = rows


class _Stub(torch.nn.Module):
    pass


def _layer_with(tokens, batch, settings):
    """A NexusQuantLayer holding ``tokens`` random tokens per (batch, KV head) compressed by ``settings``."""
    from nexusquant.cache import NexusQuantLayer

    layer = NexusQuantLayer(settings)
    k = torch.randn(batch, 8, tokens, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    keys, _ = layer.update(k, v)
    # As the nexusquant attention function would: it consumes the prompt's view, then compresses.
    # (A view nothing consumed means another attention ran, and the next step would not be fused.)
    keys._nq_view.consumed = True
    layer.compress(None)
    return layer, k, v


def bench_decode_attention(copy_gbs, results):
    from nexusquant.attention import nexusquant_attention
    from nexusquant.presets import resolve_settings

    rows = []
    settings = resolve_settings("balanced", evict=0.0, demote=0.0, recent_window=32, block=1 << 30)
    stub = _Stub()
    for batch in (1, 8):
        for tokens in (8192, 32768, 131072):
            layer, k, v = _layer_with(tokens, batch, settings)
            q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.float16)
            nk = torch.randn(batch, 8, 1, 128, device="cuda", dtype=torch.float16)
            keys, values = layer.update(nk, nk)
            view = keys._nq_view
            assert view.lazy_tiers, "fused path not taken"
            scale = 128**-0.5

            # The steps are called (and captured) only in this iteration; default arguments bind its values.
            def nq_step(view=view, q=q, keys=keys, values=values, scale=scale):
                view.consumed = False
                return nexusquant_attention(stub, q, keys, values, None, scaling=scale)[0]

            # Reference: the same compressed cache dequantized, then SDPA in float32.
            full_k, full_v = layer.materialize(_copy_view(view))
            ref = F.scaled_dot_product_attention(
                q.float(), full_k.float(), full_v.float(), scale=scale, enable_gqa=True
            )
            got = nq_step().transpose(1, 2).float()
            rel = ((got - ref).norm() / ref.norm()).item()
            kf = torch.cat([k, nk], 2)
            vf = torch.cat([v, nk], 2)

            def sdpa_step(q=q, kf=kf, vf=vf, scale=scale):
                return F.scaled_dot_product_attention(q, kf, vf, scale=scale, enable_gqa=True)

            t_nq = timed(nq_step)
            t_sdpa = timed(sdpa_step)
            g_nq = graph_timed(nq_step)
            g_sdpa = graph_timed(sdpa_step)
            kv_fp16 = 2 * kf.numel() * 2
            kv_nq = layer.nbytes()
            rows.append(
                dict(
                    batch=batch,
                    tokens=tokens,
                    nexusquant_ms=t_nq,
                    sdpa_fp16_ms=t_sdpa,
                    speedup=t_sdpa / t_nq,
                    nexusquant_gpu_ms=g_nq,
                    sdpa_fp16_gpu_ms=g_sdpa,
                    gpu_speedup=(g_sdpa / g_nq) if g_nq and g_sdpa else None,
                    nexusquant_floor_ms=kv_nq / (copy_gbs * 1e9) * 1e3,
                    sdpa_floor_ms=kv_fp16 / (copy_gbs * 1e9) * 1e3,
                    rel_error_vs_dequantized=rel,
                    kv_fp16_MB=kv_fp16 / 1e6,
                    kv_nexusquant_MB=kv_nq / 1e6,
                )
            )
            print(rows[-1], flush=True)
            layer = k = v = full_k = full_v = None
            del nq_step, sdpa_step  # their default arguments would otherwise outlive this iteration's names
            torch.cuda.empty_cache()
    results["decode_attention"] = rows


def _copy_view(view):
    import copy

    return copy.copy(view)


def llama3_8b(layers=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def bench_end_to_end(
    results,
    contexts=(32768, 131072),
    new_tokens=128,
    layers=32,
    save=None,
    presets=("balanced",),
    chunk_size=None,
    chunked_only=False,
):
    from nexusquant.compat import output_cache, with_cache

    model = llama3_8b(layers)
    weights = torch.cuda.memory_allocated()
    rows = []
    total = torch.cuda.get_device_properties(0).total_memory
    e2e = results["end_to_end"] = dict(
        rows=rows,
        weights_GB=weights / 1e9,
        device_memory_GB=total / 1e9,
        layers=layers,
        new_tokens=new_tokens,
        longest_context_extrapolated={},
    )
    modes = ("bf16 DynamicCache", *(f"nexusquant {p}" for p in presets))
    if chunk_size:
        # The same presets with chunked prefill: the prompt's full-precision KV never exists at once.
        chunked = tuple(f"nexusquant {p} chunks {chunk_size}" for p in presets)
        modes = chunked if chunked_only else modes + chunked
    e2e["settings"] = {p: resolve_settings(p).as_dict() for p in presets}
    e2e["chunk_size"] = chunk_size
    for ctx in contexts:
        ids = torch.randint(0, 128000, (1, ctx), device="cuda")
        for mode in modes:
            out = cache = gen = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                words = mode.split()
                chunks = int(words[3]) if len(words) > 3 else None
                plain = mode.startswith("bf16")
                cm = _null() if plain else nq.nexusquant_evict(model, quality=words[1], chunk_size=chunks)
                with cm as session, torch.no_grad():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model(ids, use_cache=True, logits_to_keep=1)
                    torch.cuda.synchronize()
                    prefill_s = time.perf_counter() - t0
                    cache = output_cache(out)
                    nxt = out.logits[:, -1:].argmax(-1)
                    seq = torch.cat([ids, nxt], 1)
                    t0 = time.perf_counter()
                    gen = model.generate(
                        seq,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                        **with_cache(model, cache),
                    )
                    torch.cuda.synchronize()
                    decode_s = time.perf_counter() - t0
                    if session is not None:
                        kv_bytes = session.stats()["nbytes"]
                    else:
                        kv_bytes = sum(l.keys.numel() * 2 + l.values.numel() * 2 for l in cache.layers)
                peak = torch.cuda.max_memory_allocated()
                rows.append(
                    dict(
                        context=ctx,
                        mode=mode,
                        peak_GB=peak / 1e9,
                        kv_GB=kv_bytes / 1e9,
                        prefill_s=prefill_s,
                        decode_tokens_per_s=(gen.shape[1] - seq.shape[1]) / decode_s,
                    )
                )
            except Exception as e:  # record and go on: one failing row must not lose the others
                import traceback

                traceback.print_exc()
                rows.append(dict(context=ctx, mode=mode, error=f"{type(e).__name__}: {e}"))
            print(rows[-1], flush=True)
            del out, cache, gen
            if save is not None:
                save()
    for mode in modes:
        ok = [r for r in rows if r["mode"] == mode and "error" not in r]
        if len(ok) >= 2:
            a, b = ok[0], ok[1]
            per_token = (b["peak_GB"] - a["peak_GB"]) * 1e9 / (b["context"] - a["context"])
            if per_token > 0:
                e2e["longest_context_extrapolated"][mode] = int(a["context"] + (total - a["peak_GB"] * 1e9) / per_token)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def tables(results) -> str:
    lines = [
        f"Measured on {results['device']} ({results['date']}), "
        f"`{results.get('command', 'python benches/gpu_bench.py --phase ' + results['phase'])}`.",
        "",
    ]
    if "copy_GBps" in results:
        lines.append(f"Device-to-device copy: {results['copy_GBps']:.0f} GB/s (bytes read + written).\n")
    if "codec" in results:
        lines += [
            "| bits | quantize GB/s | vs copy | dequantize GB/s | vs copy | codes differing from CPU |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["codec"]:
            lines.append(
                f"| {r['bits']} | {r['quantize_GBps']:.0f} | {r['quantize_vs_copy']:.0%} | "
                f"{r['dequantize_GBps']:.0f} | {r['dequantize_vs_copy']:.0%} | {r['codes_differing_from_cpu']} |"
            )
        lines.append("")
    if "decode_attention" in results:
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        x = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        lines += [
            "Per call (host launch included, what a decode step pays) and GPU only (the same calls "
            "replayed from a CUDA graph); floor = bytes the call must read / copy bandwidth.",
            "",
            "| batch | tokens | nexusquant ms | SDPA fp16 ms | speedup | nexusquant GPU ms | SDPA GPU ms | "
            "GPU speedup | floor ms nq / SDPA | KV MB fp16 → nexusquant | rel. error |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["decode_attention"]:
            lines.append(
                f"| {r['batch']} | {r['tokens']} | {r['nexusquant_ms']:.3f} | {r['sdpa_fp16_ms']:.3f} | "
                f"{r['speedup']:.2f}x | {f(r.get('nexusquant_gpu_ms'))} | {f(r.get('sdpa_fp16_gpu_ms'))} | "
                f"{x(r.get('gpu_speedup'))} | {f(r.get('nexusquant_floor_ms'))} / {f(r.get('sdpa_floor_ms'))} | "
                f"{r['kv_fp16_MB']:.0f} → {r['kv_nexusquant_MB']:.0f} | {r['rel_error_vs_dequantized']:.1e} |"
            )
        lines.append("")
    if "end_to_end" in results:
        e = results["end_to_end"]
        lines += [
            f"Llama-3-8B-shaped ({e.get('layers', 32)} layers), random bf16 weights ({e['weights_GB']:.1f} GB), "
            f"device memory {e['device_memory_GB']:.0f} GB, {e.get('new_tokens', 128)} new tokens, batch 1.",
            "",
            "| context | cache | peak GB | KV GB | prefill s | decode tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in e["rows"]:
            if "error" in r:
                lines.append(f"| {r['context']} | {r['mode']} | failed: {r['error'][:80]} | | | |")
                continue
            lines.append(
                f"| {r['context']} | {r['mode']} | {r['peak_GB']:.1f} | {r['kv_GB']:.2f} | {r['prefill_s']:.1f} | "
                f"{r['decode_tokens_per_s']:.1f} |"
            )
        lines.append("")
        for p, st in e.get("settings", {}).items():
            lines.append(
                f"nexusquant {p}: evict {st['evict']}, demote {st['demote']}, "
                f"key/value bits {st['key_bits']}/{st['value_bits']}, recent window {st['recent_window']}."
            )
        lines.append("")
        for mode, n in e["longest_context_extrapolated"].items():
            lines.append(
                f"Longest context that fits ({mode}), extrapolated from the peak memory per token: {n:,} tokens."
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--phase", default="all", choices=["kernels", "e2e", "all"])
    ap.add_argument("--contexts", default="32768,131072", help="e2e prompt lengths (two, for the extrapolation)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="e2e decoder layers (32 = Llama-3-8B)")
    ap.add_argument("--presets", default="balanced", help="e2e: nexusquant presets run beside the bf16 cache")
    ap.add_argument("--chunk-size", type=int, default=None, help="e2e: also run each preset with chunked prefill")
    ap.add_argument("--chunked-only", action="store_true", help="e2e: only the chunked runs (long contexts)")
    args = ap.parse_args()
    assert gpu.available(), "CUDA kernels unavailable"
    results = dict(
        device=torch.cuda.get_device_name(0),
        date=str(date.today()),
        phase=args.phase,
        torch=torch.__version__,
        host=platform.node(),
        command="python benches/gpu_bench.py " + " ".join(sys.argv[1:]),
    )
    if args.phase in ("kernels", "all"):
        results["copy_GBps"] = copy_bandwidth()
        bench_codec(results["copy_GBps"], results)
        bench_decode_attention(results["copy_GBps"], results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / f"gpu_bench_{args.phase}.json").write_text(json.dumps(results, indent=2))
        md = tables(results)
        (out / f"gpu_bench_{args.phase}.md").write_text(md)
        return md

    if args.phase in ("kernels", "all"):
        save()
    if args.phase in ("e2e", "all"):
        bench_end_to_end(
            results,
            tuple(int(c) for c in args.contexts.split(",")),
            args.new_tokens,
            args.layers,
            save,
            tuple(args.presets.split(",")),
            args.chunk_size,
            args.chunked_only,
        )
    print(save())


if __name__ == "__main__":
    main()
