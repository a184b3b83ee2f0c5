"""GPU measurements of nexusquant: one script that checks and times everything in one call.

    python benches/gpu_bench.py --out DIR [--phase kernels|e2e|fair|all]

kernels: device-to-device copy bandwidth (bytes read + written), then quantize and dequantize of a
    Llama-3-8B-shaped KV block (fp16 in/out) against it; decode attention over the compressed
    cache (the real nexusquant path: fused kernel + full-precision window) against PyTorch SDPA on
    fp16 K/V, Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128) at 8K, 32K and 128K
    tokens, batch 1 and 8. Every timed variant is first checked against the CPU reference.
e2e: a Llama-3-8B-shaped model with random bf16 weights; prefill 32K and 128K tokens, then generate
    128 tokens, with and without nexusquant: peak torch.cuda.max_memory_allocated, KV bytes, prefill
    time (the difference is the time to compress), decode tokens/s; and the longest context that
    fits, extrapolated from the measured peak memory per token.
fair: decode tokens/s of nexusquant and of the bf16 cache through one and the same decode loop
    (one-token forwards, greedy token fed back, positions given, CUDA-event timed after warm-up
    steps; no generate), the bf16 cache given static shapes (StaticCache, preallocated) and also
    replayed from a CUDA graph; at --fair-context tokens, batch 1 after a real (chunked) prefill,
    larger batches over caches filled with random K/V. With the peak-memory breakdown of the
    chunked prefill (weights, compressed KV, what is live at the last chunk's peak). Not part of
    "all". Files: gpu_bench_e2e_fair.{json,md}.

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
from nexusquant.eval.methods import parse_variant
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


def run_header(script: str) -> dict:
    """Where and how a bench ran: the device, the day, torch, and the command line."""
    return dict(
        device=torch.cuda.get_device_name(0),
        date=str(date.today()),
        torch=torch.__version__,
        command=f"python benches/{script} " + " ".join(sys.argv[1:]),
    )


def write_results(out_dir, stem: str, result: dict, md: str) -> None:
    """``out_dir/stem.json`` (the measurements) and ``out_dir/stem.md`` (the table), then print the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(md)
    print(md)


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


def _e2e_once(model, mode, ids, new_tokens):
    """One prefill of ``ids`` and ``new_tokens`` greedy tokens through ``model.generate`` in ``mode``
    (``"bf16 DynamicCache"`` or ``"nexusquant <preset>[ chunks <n>]"``), timed on the host."""
    from nexusquant.compat import output_cache, with_cache

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
        del out
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
    return dict(prefill_s=prefill_s, decode_s=decode_s, generated=gen.shape[1] - seq.shape[1], kv_bytes=kv_bytes)


def bench_end_to_end(
    results,
    contexts=(32768, 131072),
    new_tokens=128,
    layers=32,
    save=None,
    presets=("balanced",),
    chunk_size=None,
    chunked_only=False,
    warmup_tokens=4096,
):
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
        warmup_tokens=warmup_tokens,
        longest_context_extrapolated={},
    )
    modes = ("bf16 DynamicCache", *(f"nexusquant {p}" for p in presets))
    if chunk_size:
        # The same presets with chunked prefill: the prompt's full-precision KV never exists at once.
        chunked = tuple(f"nexusquant {p} chunks {chunk_size}" for p in presets)
        modes = chunked if chunked_only else modes + chunked
    e2e["settings"] = {p: resolve_settings(p).as_dict() for p in presets}
    e2e["chunk_size"] = chunk_size
    warmed = set()
    for ctx in contexts:
        ids = torch.randint(0, 128000, (1, ctx), device="cuda")
        for mode in modes:
            out = None
            try:
                if warmup_tokens and mode not in warmed:
                    # A short untimed run of the same mode first: the first call of each kernel
                    # compiles it (NVRTC) and plans it, which is not what a user waits for per token.
                    warm_ids = torch.randint(0, 128000, (1, min(warmup_tokens, ctx)), device="cuda")
                    _e2e_once(model, mode, warm_ids, 4)
                    warmed.add(mode)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                out = _e2e_once(model, mode, ids, new_tokens)
                peak = torch.cuda.max_memory_allocated()
                rows.append(
                    dict(
                        context=ctx,
                        mode=mode,
                        peak_GB=peak / 1e9,
                        kv_GB=out["kv_bytes"] / 1e9,
                        prefill_s=out["prefill_s"],
                        decode_tokens_per_s=out["generated"] / out["decode_s"],
                    )
                )
            except Exception as e:  # record and go on: one failing row must not lose the others
                import traceback

                traceback.print_exc()
                rows.append(dict(context=ctx, mode=mode, error=f"{type(e).__name__}: {e}"))
            print(rows[-1], flush=True)
            del out
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


# ---------------------------------------------------------------------------------------------
# fair: one decode loop for every cache (issue 14 item 5)

FOLDED = "bf16_folded_sdpa"


def _folded_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The bf16 baseline's decode attention without transformers' K/V repetition: with one query
    token, the query heads that share a KV head become that head's query rows (head h reads KV head
    h // group, as repeat_kv has it), so SDPA reads each K/V byte once, masked, at static shapes.
    Anything else (the prefill) goes to transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q, d = query.shape
    hk = key.shape[1]
    if q != 1 or hq == hk:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query.reshape(b, hk, hq // hk, d), key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


MATMUL = "bf16_folded_matmul"
NAMES = {"sdpa": "sdpa (K/V repeated per query head)", FOLDED: "folded GQA sdpa", MATMUL: "folded GQA matmul"}


def _folded_matmul(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The same folding as :func:`_folded_sdpa`, the attention as two batched matmuls (scores,
    masked float32 softmax, weighted values): cuBLAS spreads the 131K-long reduction over the
    whole GPU, where SDPA's kernels get one block per (batch, KV head) for a single query row
    group. Static shapes, so it is captured in a CUDA graph as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q, d = query.shape
    hk = key.shape[1]
    if q != 1 or hq == hk:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scores = torch.matmul(query.reshape(b, hk, hq // hk, d), key.transpose(2, 3)).float()
    scores = scores * (d**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def _register_folded():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in ((FOLDED, _folded_sdpa), (MATMUL, _folded_matmul)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


def _attention_check(static, ctx):
    """The folded attentions on layer 0's static K/V, a random query, the first ``ctx`` slots
    allowed: rel. error against float32 attention over those slots alone."""
    k, v = static.layers[0].keys, static.layers[0].values
    b, hk, slots, d = k.shape
    q = torch.randn(b, 4 * hk, 1, d, device=k.device, dtype=k.dtype)
    mask = torch.zeros(b, 1, 1, slots, dtype=torch.bool, device=k.device)
    mask[..., :ctx] = True
    ref = F.scaled_dot_product_attention(
        q.float(), k[:, :, :ctx].float(), v[:, :, :ctx].float(), scale=d**-0.5, enable_gqa=True
    ).transpose(1, 2)
    errors = {}
    for name, fn in ((FOLDED, _folded_sdpa), (MATMUL, _folded_matmul)):
        got = fn(None, q, k, v, mask, scaling=d**-0.5)[0].float()
        errors[name] = ((got - ref).norm() / ref.norm()).item()
    return errors


class _attention:
    """Every config of ``model`` set to attention implementation ``name`` inside the block."""

    def __init__(self, model, name):
        from nexusquant.evict import _configs

        self.saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
        self.name = name

    def __enter__(self):
        for c, _ in self.saved:
            c._attn_implementation_internal = self.name

    def __exit__(self, *a):
        for c, impl in self.saved:
            c._attn_implementation_internal = impl
        return False


class _Clock:
    """Seconds between start() and stop(): CUDA events on the GPU, the host clock on the CPU
    (--tiny, a logic check only)."""

    def start(self):
        if torch.cuda.is_available():
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop(self):
        if torch.cuda.is_available():
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b) / 1e3
        return time.perf_counter() - self.t


def _step(model, cache, tok, position):
    """One decode forward: ``tok`` (B, 1) at ``position`` (B, 1); the greedy next tokens."""
    from nexusquant.compat import with_cache

    out = model(input_ids=tok, position_ids=position, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
    return out.logits[:, -1:].argmax(-1), out.logits


def decode_loop(model, cache, tok, start, steps, warmup):
    """The decode loop every cache goes through: ``warmup`` then ``steps`` one-token forwards, the
    greedy token fed back, positions passed explicitly (made on the device, no host copy). Timed
    over the ``steps`` with CUDA events. Returns seconds per step."""
    b = tok.shape[0]
    pos = torch.full((b, 1), start, dtype=torch.long, device=tok.device)
    for _ in range(warmup):
        tok, _ = _step(model, cache, tok, pos)
        pos = pos + 1
    clock = _Clock()
    clock.start()
    for _ in range(steps):
        tok, _ = _step(model, cache, tok, pos)
        pos = pos + 1
    return clock.stop() / steps


def _rewind(cache, length):
    """A StaticCache set back to ``length`` tokens (its slots past that are overwritten next)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def graph_decode_loop(model, cache, tok, start, steps, warmup):
    """The same forward as :func:`decode_loop` on a StaticCache, captured once in a CUDA graph and
    replayed per step (the host's Python and launches taken out, as torch.compile's
    reduce-overhead mode would). Warm-up and capture outside the timing. Seconds per step."""
    b = tok.shape[0]
    s_tok = tok.clone()
    s_pos = torch.full((b, 1), start, dtype=torch.long, device=tok.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _rewind(cache, start)
            _step(model, cache, s_tok, s_pos)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _rewind(cache, start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out, _ = _step(model, cache, s_tok, s_pos)
    # Capture ran nothing: the cache is still at ``start``; each replay appends one token there.

    def replay():
        graph.replay()
        s_tok.copy_(s_out)
        s_pos.add_(1)

    for _ in range(warmup):
        replay()
    clock = _Clock()
    clock.start()
    for _ in range(steps):
        replay()
    return clock.stop() / steps


def _static_cache(model, max_len, fill):
    """A transformers StaticCache of ``max_len`` slots per layer, its first tokens set by
    ``fill(i) -> (keys, values)`` through the cache's own update."""
    from transformers.cache_utils import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for i in range(len(cache.layers)):
        k, v = fill(i)
        cache.update(k, v, i)
        del k, v
    return cache


class _ChunkMemory:
    """Per-chunk peak memory of a chunked prefill (nexusquant.evict's forward_in_chunks wrapped for
    the block, nothing else changed) and, for the last chunk, the allocator's history, from which
    :func:`_live_at_peak` reads what is live at that chunk's peak."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.rows = []
        self.cache = None
        self.base = None
        self.cuda = torch.cuda.is_available()

    def __enter__(self):
        import nexusquant.evict as ev

        self.ev, self.orig = ev, ev.forward_in_chunks

        def wrapped(forward, kwargs, chunk_size, cache_name, before_chunk=None, **kw):
            self.cache = kwargs.get(cache_name)

            def before(ids):
                self._before()
                if before_chunk is not None:
                    before_chunk(ids)

            return self.orig(forward, kwargs, chunk_size, cache_name, before_chunk=before, **kw)

        ev.forward_in_chunks = wrapped
        return self

    def _before(self):
        if not self.cuda:
            self.rows.append({})
            return
        if self.rows:
            self.rows[-1]["peak"] = torch.cuda.max_memory_allocated()
        row = dict(allocated_at_start=torch.cuda.memory_allocated())
        self.rows.append(row)
        torch.cuda.reset_peak_memory_stats()
        if len(self.rows) == self.chunks:
            from nexusquant.cache import compression_stats

            row["cache_bytes_at_start"] = compression_stats(self.cache)["nbytes"]
            self.base = row["allocated_at_start"]
            torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python")

    def finish(self):
        """After the prefill: the last chunk's peak and its history (None on the CPU)."""
        if not self.cuda:
            return None
        self.rows[-1]["peak"] = torch.cuda.max_memory_allocated()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return snap

    def __exit__(self, *a):
        self.ev.forward_in_chunks = self.orig
        return False


def _label(frames):
    """The innermost nexusquant or transformers frame of an allocation's stack (innermost first)."""
    for f in frames:
        name = f.get("filename", "")
        for key in ("/nexusquant/", "/transformers/"):
            if key in name:
                return f"{name.split(key)[-1]}:{f.get('line')} {f.get('name')} ({key.strip('/')})"
    f = frames[0] if frames else {}
    return f"{f.get('filename', '?')}:{f.get('line')} {f.get('name')}"


def _live_at_peak(snap, top=12):
    """Replay the allocator history: bytes above the recording's start at its highest point, and
    the allocations made since and still live then, grouped by the code that made them."""
    dev = torch.cuda.current_device()
    trace = snap["device_traces"][dev]
    cur = best = 0
    best_i = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            cur += e["size"]
        elif e["action"] == "free_completed":
            cur -= e["size"]
        else:
            continue
        if cur > best:
            best, best_i = cur, i
    live = {}
    for e in trace[: best_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups = {}
    for e in live.values():
        label = _label(e.get("frames", []))
        g = groups.setdefault(label, [0, 0])
        g[0] += e["size"]
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return dict(
        above_start_bytes=best,
        new_live_bytes=sum(e["size"] for e in live.values()),
        events=len(trace),
        groups=[dict(where=k, bytes=v[0], allocations=v[1]) for k, v in ranked[:top]],
        other_bytes=sum(v[0] for _, v in ranked[top:]),
    )


def tiny_llama(layers=2):
    """A small Llama for --tiny (CPU logic check of the fair phase; its numbers mean nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1000,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def bench_fair(
    results, ctx, batches, steps, warmup, layers, batch_layers, preset, chunk_size, save, tiny=False, knobs=None
):
    from nexusquant.compat import output_cache

    knobs = dict(knobs or {})
    label = f"nexusquant {preset}" + (" [" + ",".join(f"{k}={v}" for k, v in knobs.items()) + "]" if knobs else "")
    # A knob of the chunked prefill, not of the cache's settings.
    recode = bool(knobs.pop("recode_prompt", True))

    _register_folded()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    mem = torch.cuda.memory_allocated if cuda else (lambda: 0)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    empty = torch.cuda.empty_cache if cuda else (lambda: None)
    make = tiny_llama if tiny else llama3_8b
    slots = ctx + -(-(warmup + steps + 2) // 64) * 64  # static slots: the prompt + the steps, a multiple of 64
    rows = []
    fair = results["fair"] = dict(
        context=ctx,
        steps=steps,
        warmup=warmup,
        preset=preset,
        knobs=knobs,
        settings=resolve_settings(preset, **knobs).as_dict(),
        chunk_size=chunk_size,
        recode_prompt=recode,
        static_slots=slots,
        rows=rows,
    )

    def record(**row):
        rows.append(row)
        print(row, flush=True)
        if save is not None:
            save()

    def timed_row(name, fn, **extra):
        """Run one decode variant; a failure is recorded, not raised (the other rows still count)."""
        empty()
        reset()
        try:
            s = fn()
            b = extra["batch"]
            record(cache=name, ms_per_step=s * 1e3, tokens_per_s=b / s, peak_GB=peak() / 1e9, **extra)
        except Exception as e:
            import traceback

            traceback.print_exc()
            if cuda:
                torch.cuda.synchronize()
            record(cache=name, error=f"{type(e).__name__}: {e}"[:300], **extra)

    model = make(layers)
    weights = mem()
    fair["weights_GB"] = {layers: weights / 1e9}
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size - 1, (1, ctx), device=dev)
    base = dict(batch=1, layers=layers, context=ctx)

    if 1 in batches:
        # bf16: a one-shot prefill into transformers' DynamicCache, then the same tokens in a StaticCache.
        with torch.no_grad():
            reset()
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            if cuda:
                torch.cuda.synchronize()
            fair["bf16_prefill_s"] = time.perf_counter() - t0
            fair["bf16_prefill_peak_GB"] = peak() / 1e9
            dyn = output_cache(out)
            tok0 = out.logits[:, -1:].argmax(-1)
            del out
            fair["bf16_kv_GB"] = sum(l.keys.numel() * 2 + l.values.numel() * 2 for l in dyn.layers) / 1e9
            timed_row(
                "bf16 DynamicCache, sdpa",
                lambda: decode_loop(model, dyn, tok0, ctx, steps, warmup),
                **base,
                loop="eager",
            )
            if cuda:
                # The same with SDPA held to the flash kernel: no per-length plan (cuDNN's), but
                # still a DynamicCache (each step concatenates the layer's whole K/V).
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def flash():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        return decode_loop(model, dyn, tok0, dyn.get_seq_length(), steps, warmup)

                timed_row("bf16 DynamicCache, sdpa flash only", flash, **base, loop="eager")
            layers_kv = [(l.keys[:, :, :ctx], l.values[:, :, :ctx]) for l in dyn.layers]
            del dyn

            def take(i):
                kv = layers_kv[i]
                layers_kv[i] = None  # each prompt layer freed once copied
                return kv

            static = _static_cache(model, slots, take)
            del layers_kv
            # The folded attention against transformers' own SDPA path: the same step, both ways.
            pos = torch.full((1, 1), ctx, dtype=torch.long, device=dev)
            fair["attention_rel_error_vs_float32"] = _attention_check(static, ctx)
            logits = {}
            for impl in ("sdpa", FOLDED, MATMUL):
                with _attention(model, impl):
                    _rewind(static, ctx)
                    logits[impl] = _step(model, static, tok0, pos)[1].float()
            fair["logits_rel_error_vs_sdpa"] = {
                impl: ((logits[impl] - logits["sdpa"]).norm() / logits["sdpa"].norm()).item()
                for impl in (FOLDED, MATMUL)
            }
            del logits
            variants = [("sdpa", "eager"), (FOLDED, "eager"), (MATMUL, "eager")]
            if cuda:
                variants += [("sdpa", "cuda graph"), (FOLDED, "cuda graph"), (MATMUL, "cuda graph")]
            for impl, loop in variants:
                name = "bf16 StaticCache, " + NAMES[impl]
                fn = graph_decode_loop if loop == "cuda graph" else decode_loop

                def run(fn=fn, impl=impl):
                    with _attention(model, impl):
                        _rewind(static, ctx)
                        return fn(model, static, tok0, ctx, steps, warmup)

                timed_row(name, run, **base, loop=loop)
            del static
        empty()

        # nexusquant: chunked prefill (memory broken down), then the same decode loop.
        chunks = -(-ctx // chunk_size)
        reset()
        with (
            nq.nexusquant_evict(model, quality=preset, chunk_size=chunk_size, recode_prompt=recode, **knobs),
            torch.no_grad(),
        ):
            with _ChunkMemory(chunks) as cm:
                before = mem()
                t0 = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)
                if cuda:
                    torch.cuda.synchronize()
                prefill_s = time.perf_counter() - t0
                snap = cm.finish()
            cache = output_cache(out)
            tok0 = out.logits[:, -1:].argmax(-1)
            del out
            from nexusquant.cache import compression_stats

            kv = compression_stats(cache)["nbytes"]
            after = mem()
            m = dict(
                weights_bytes=weights,
                allocated_before_prefill=before,
                compressed_kv_bytes=kv,
                allocated_after_prefill=after,
                prefill_s=prefill_s,
                chunks=chunks,
            )
            if cuda:
                per_chunk = [r["peak"] for r in cm.rows]
                last = cm.rows[-1]
                m.update(
                    peak_bytes=max(per_chunk),
                    peak_chunk=int(np.argmax(per_chunk)) + 1,
                    last_chunk=last,
                    per_chunk_peak_GB=[round(p / 1e9, 3) for p in per_chunk],
                    live_at_last_chunk_peak=_live_at_peak(snap),
                )
                del snap
            fair["memory"] = m
            print({k: v for k, v in m.items() if k not in ("per_chunk_peak_GB", "live_at_last_chunk_peak")}, flush=True)
            timed_row(
                label,
                lambda cache=cache, tok0=tok0: decode_loop(model, cache, tok0, cache.get_seq_length(), steps, warmup),
                **base,
                loop="eager",
                kv_GB=kv / 1e9,
            )
            del cache
        empty()

    big = [b for b in batches if b != 1]
    if big:
        del model
        empty()
        model = make(batch_layers)
        fair["weights_GB"][batch_layers] = mem() / 1e9
        cfg = model.config
        shape = (cfg.num_key_value_heads, ctx, cfg.head_dim)
    for b in big:
        base = dict(batch=b, layers=batch_layers, context=ctx, kv_filled="random")
        tok0 = torch.randint(0, cfg.vocab_size - 1, (b, 1), device=dev)
        with nq.nexusquant_evict(model, quality=preset, **knobs), torch.no_grad():
            from nexusquant.cache import NexusQuantCache

            cache = NexusQuantCache(model, preset=preset, **knobs)
            t0 = time.perf_counter()
            for layer in cache.layers:
                k = torch.randn(b, *shape, device=dev, dtype=torch.bfloat16)
                keys, _ = layer.update(k, torch.randn_like(k))
                keys._nq_view.consumed = True  # as the nexusquant attention would, before compressing
                layer.compress(None)
                del k, keys
            if cuda:
                torch.cuda.synchronize()
            fill_s = time.perf_counter() - t0
            kv = cache.nbytes()
            timed_row(
                label,
                lambda cache=cache, tok0=tok0: decode_loop(model, cache, tok0, ctx, steps, warmup),
                **base,
                loop="eager",
                kv_GB=kv / 1e9,
                compress_s=fill_s,
            )
            del cache
        empty()
        with torch.no_grad():
            try:
                static = _static_cache(
                    model,
                    slots,
                    lambda i, b=b: (
                        torch.randn(b, *shape, device=dev, dtype=torch.bfloat16),
                        torch.randn(b, *shape, device=dev, dtype=torch.bfloat16),
                    ),
                )
            except Exception as e:  # the bf16 cache may not fit: say so
                record(cache="bf16 StaticCache", error=f"{type(e).__name__}: {e}"[:300], **base)
                static = None
            if static is not None:
                # transformers' own path is left out here: repeat_kv's copies (8 GiB per K and V per
                # layer at batch 8) do not fit beside this cache (out of memory in the first run).
                variants = [(FOLDED, "eager"), (MATMUL, "eager")]
                if cuda:
                    variants += [(FOLDED, "cuda graph"), (MATMUL, "cuda graph")]
                for impl, loop in variants:
                    name = "bf16 StaticCache, " + NAMES[impl]
                    fn = graph_decode_loop if loop == "cuda graph" else decode_loop

                    def run(fn=fn, impl=impl, static=static, tok0=tok0):
                        with _attention(model, impl):
                            _rewind(static, ctx)
                            return fn(model, static, tok0, ctx, steps, warmup)

                    kv = 2 * len(static.layers) * b * int(np.prod(shape)) * 2
                    timed_row(name, run, **base, loop=loop, kv_GB=kv / 1e9)
                    del run
                del static
        empty()


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
            f"device memory {e['device_memory_GB']:.0f} GB, {e.get('new_tokens', 128)} new tokens, batch 1"
            + (
                f"; each mode warmed up once untimed on {e['warmup_tokens']} tokens."
                if e.get("warmup_tokens")
                else "; no warm-up (the first row of each mode includes compiling its kernels)."
            ),
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
    if "fair" in results:
        lines += fair_tables(results["fair"])
    return "\n".join(lines)


def fair_tables(f) -> list:
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    st = f["settings"]
    keys = f"pca {st['key_rate']} b/elem {st['key_domain']}" if st["key_codec"] == "pca" else f"E8 {st['key_bits']}-bit"
    lines = [
        f"Decode at {f['context']:,} tokens of context, one loop for every cache ({f['warmup']} warm-up steps, "
        f"then {f['steps']} timed with CUDA events): one-token forwards, greedy token fed back. bf16 "
        f"StaticCache holds {f['static_slots']:,} slots. nexusquant {f['preset']} "
        f"({keys} keys, {st['value_bits']}-bit values, evict {st['evict']}). "
        "tok/s = batch / seconds per step; x = nexusquant's tok/s over that row's.",
        "",
        "| batch | layers | cache | loop | ms/step | tok/s | nexusquant x | peak GB | KV GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nqs = {
        (r["batch"], r["layers"]): r["tokens_per_s"]
        for r in f["rows"]
        if r["cache"].startswith("nexusquant") and "error" not in r
    }
    for r in f["rows"]:
        head = f"| {r['batch']} | {r['layers']} | {r['cache']} | {r.get('loop', '')} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:100]} | | | | |")
            continue
        n = nqs.get((r["batch"], r["layers"]))
        x = "" if r["cache"].startswith("nexusquant") or n is None else f"{n / r['tokens_per_s']:.2f}x"
        kv = f"{r['kv_GB']:.2f}" if "kv_GB" in r else ""
        lines.append(f"{head} {r['ms_per_step']:.1f} | {r['tokens_per_s']:.1f} | {x} | {r['peak_GB']:.1f} | {kv} |")
    lines.append("")
    for name, key in ((FOLDED, "folded GQA sdpa"), (MATMUL, "folded GQA matmul")):
        att = f.get("attention_rel_error_vs_float32", {}).get(name)
        lg = f.get("logits_rel_error_vs_sdpa", {}).get(name)
        if att is not None:
            lines.append(
                f"{key}: attention output rel. error {att:.1e} against float32 attention over the valid slots "
                f"(layer 0, random query); logits {lg:.1e} from transformers' SDPA path's, same step."
            )
    if "bf16_prefill_s" in f:
        lines.append(
            f"bf16 one-shot prefill: {f['bf16_prefill_s']:.1f} s, peak {f['bf16_prefill_peak_GB']:.1f} GB, "
            f"KV {f['bf16_kv_GB']:.2f} GB."
        )
    m = f.get("memory")
    if m and "peak_bytes" in m:
        last = m["last_chunk"]
        live = m["live_at_last_chunk_peak"]
        w, kv, pk = m["weights_bytes"], m["compressed_kv_bytes"], m["peak_bytes"]
        ws = last["peak"] - last["allocated_at_start"]
        lines += [
            "",
            f"Peak memory of the nexusquant chunked prefill ({m['chunks']} chunks of {f['chunk_size']}, "
            f"recode_prompt={f.get('recode_prompt', True)}, {m['prefill_s']:.1f} s), batch 1:",
            "",
            "| part | GB |",
            "|---|---|",
            f"| weights | {gb(w)} |",
            f"| compressed KV after the prefill (cache nbytes) | {gb(kv)} |",
            f"| allocated after the prefill | {gb(m['allocated_after_prefill'])} |",
            f"| allocated when the last chunk starts | {gb(last['allocated_at_start'])} |",
            f"| of which the cache (codes + the held full-precision chunk) | {gb(last['cache_bytes_at_start'])} |",
            f"| last chunk's working set (its peak - allocated at its start) | {gb(ws)} |",
            f"| peak of the prefill (chunk {m['peak_chunk']} of {m['chunks']}) | {gb(pk)} |",
            f"| target: weights + 1.5 x KV + last chunk's working set | {gb(w + 1.5 * kv + ws)} |",
            "",
            f"Live at the last chunk's peak, allocated during that chunk ({gb(live['new_live_bytes'])} GB; "
            f"{live['events']} allocator events), by the innermost nexusquant/transformers frame:",
            "",
            "| where | GB | allocations |",
            "|---|---|---|",
        ]
        for g in live["groups"]:
            lines.append(f"| {g['where']} | {gb(g['bytes'])} | {g['allocations']} |")
        lines.append(f"| (the rest) | {gb(live['other_bytes'])} | |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--phase", default="all", choices=["kernels", "e2e", "fair", "all"])
    ap.add_argument("--contexts", default="32768,131072", help="e2e prompt lengths (two, for the extrapolation)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="e2e decoder layers (32 = Llama-3-8B)")
    ap.add_argument("--presets", default="balanced", help="e2e: nexusquant presets run beside the bf16 cache")
    ap.add_argument("--chunk-size", type=int, default=None, help="e2e: also run each preset with chunked prefill")
    ap.add_argument("--chunked-only", action="store_true", help="e2e: only the chunked runs (long contexts)")
    ap.add_argument("--fair-context", type=int, default=131072, help="fair: context tokens")
    ap.add_argument("--fair-batches", default="1,8", help="fair: batch sizes (1 after a real prefill)")
    ap.add_argument("--fair-batch-layers", type=int, default=24, help="fair: decoder layers for batches above 1")
    ap.add_argument(
        "--e2e-warmup-tokens",
        type=int,
        default=4096,
        help="e2e: each mode first runs once untimed on a prompt of this many tokens (kernels compiled "
        "outside the timing); 0 = none",
    )
    ap.add_argument("--warmup", type=int, default=4, help="fair: untimed decode steps before the timed ones")
    ap.add_argument("--tiny", action="store_true", help="fair: a small Llama, for a logic check on the CPU")
    ap.add_argument(
        "--knobs",
        default="",
        help="fair: knobs over the preset, as in nexusquant eval's --variant (key_codec=pca,key_rate=3.5)",
    )
    args = ap.parse_args()
    if not args.tiny:
        assert gpu.available(), "CUDA kernels unavailable"
    results = dict(
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
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

    stem = "e2e_fair" if args.phase == "fair" else args.phase

    def save():
        (out / f"gpu_bench_{stem}.json").write_text(json.dumps(results, indent=2, default=str))
        md = tables(results)
        (out / f"gpu_bench_{stem}.md").write_text(md)
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
            args.e2e_warmup_tokens,
        )
    if args.phase == "fair":
        bench_fair(
            results,
            args.fair_context,
            tuple(int(b) for b in args.fair_batches.split(",")),
            args.new_tokens,
            args.warmup,
            args.layers,
            args.fair_batch_layers,
            args.presets.split(",")[0],
            args.chunk_size or 2048,
            save,
            args.tiny,
            parse_variant(f"{args.presets.split(',')[0]}:{args.knobs}").knobs if args.knobs else None,
        )
    print(save())


if __name__ == "__main__":
    main()
