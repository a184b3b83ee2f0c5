"""Host (Python) time of nexusquant's decode step, per layer, on a CUDA device.

    python benches/results/decode_host_overhead.py [--root python] [--ctx 32768] [--layers 8]
        [--steps 128] [--bf16] [--profile N]

An 8B-shaped Llama (random weights, 32 query / 8 KV heads of 128, --layers decoder layers), a
chunked nexusquant "high" prefill of --ctx tokens, then the decode loop of benches/gpu_bench.py
--phase fair (one-token forwards, explicit positions, greedy token fed back): ms per step from CUDA
events over --steps steps; then the same number of steps with NexusQuantLayer.update and the
attention function wrapped in host clocks (us per layer per step spent in nexusquant's own Python,
launches included); --profile N: a cProfile of N more steps (top entries by own time). --bf16 also
runs transformers' DynamicCache under SDPA held to flash, for the model's own cost. --root: the
directory holding the nexusquant package (to compare two versions of it in one run).
"""

from __future__ import annotations

import argparse
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--root", default="python")
ap.add_argument("--ctx", type=int, default=32768)
ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--steps", type=int, default=128)
ap.add_argument("--warmup", type=int, default=8)
ap.add_argument("--bf16", action="store_true")
ap.add_argument("--profile", type=int, default=0)
args = ap.parse_args()
sys.path.insert(0, args.root)

import torch  # noqa: E402
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import nexusquant as nq  # noqa: E402
from nexusquant import attention as nq_attention  # noqa: E402
from nexusquant import cache as nq_cache  # noqa: E402
from nexusquant.compat import output_cache, with_cache  # noqa: E402

print("nexusquant from", nq.__file__, flush=True)
cfg = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=args.layers,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size - 1, (1, args.ctx), device="cuda")


tokens: list = []  # every decode step's greedy token, to compare versions (same weights, same prompt)
last_logits: list = []


def step(cache, tok, pos):
    out = model(input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
    tok = out.logits[:, -1:].argmax(-1)
    tokens.append(tok)
    last_logits[:] = [out.logits]
    return tok


def loop(cache, tok, pos, n):
    for _ in range(n):
        tok = step(cache, tok, pos)
        pos = pos + 1
    return tok, pos


def timed(cache, tok, pos, n):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    tok, pos = loop(cache, tok, pos, n)
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n, tok, pos


clock = {"update": 0.0, "attention": 0.0}
orig_update, orig_attention = nq_cache.NexusQuantLayer.update, nq_attention.nexusquant_attention


def clocked_update(self, *a, **k):
    t = time.perf_counter()
    r = orig_update(self, *a, **k)
    clock["update"] += time.perf_counter() - t
    return r


def clocked_attention(*a, **k):
    t = time.perf_counter()
    r = orig_attention(*a, **k)
    clock["attention"] += time.perf_counter() - t
    return r


with torch.no_grad():
    if args.bf16:
        model.set_attn_implementation("sdpa")
        dyn = DynamicCache(config=cfg)
        out = model(ids, use_cache=True, logits_to_keep=1, **with_cache(model, dyn))
        tok = out.logits[:, -1:].argmax(-1)
        del out
        pos = torch.full((1, 1), args.ctx, dtype=torch.long, device="cuda")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            tok, pos = loop(dyn, tok, pos, args.warmup)
            ms, tok, pos = timed(dyn, tok, pos, args.steps)
        print(f"bf16 DynamicCache flash: {ms:.2f} ms/step, {ms * 1e3 / args.layers:.0f} us per layer", flush=True)
        del dyn
        torch.cuda.empty_cache()

    with nq.nexusquant_evict(model, quality="high", chunk_size=2048):
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
        del out
        pos = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device="cuda")
        tok, pos = loop(cache, tok, pos, args.warmup)
        ms, tok, pos = timed(cache, tok, pos, args.steps)
        ms2, tok, pos = timed(cache, tok, pos, args.steps)
        n = args.steps * args.layers
        # Host clocks around nexusquant's two entry points.
        nq_cache.NexusQuantLayer.update = clocked_update
        AttentionInterface.register("nexusquant", clocked_attention)
        t0 = time.perf_counter()
        tok, pos = loop(cache, tok, pos, args.steps)
        host_ms = (time.perf_counter() - t0) * 1e3 / args.steps
        torch.cuda.synchronize()
        nq_cache.NexusQuantLayer.update = orig_update
        AttentionInterface.register("nexusquant", orig_attention)
        print(
            f"nexusquant high, {args.layers} layers, {args.ctx} tokens: {ms:.2f} / {ms2:.2f} ms/step "
            f"({ms * 1e3 / args.layers:.0f} us per layer); host clocks: update "
            f"{clock['update'] / n * 1e6:.1f} us + attention {clock['attention'] / n * 1e6:.1f} us "
            f"per layer per step (step {host_ms:.2f} ms on the host clock)",
            flush=True,
        )
        print(cache.layers[0], flush=True)
        nq_tokens = torch.cat(tokens[-3 * args.steps :], dim=1)
        weights = torch.arange(1, nq_tokens.shape[1] + 1, device="cuda", dtype=torch.float64)
        print(
            f"tokens checksum {int((nq_tokens[0].double() * weights).sum())}"
            f" over {nq_tokens.shape[1]} steps; last logits sum {float(last_logits[0].double().sum())!r}",
            flush=True,
        )
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            tok, pos = loop(cache, tok, pos, args.profile)
            torch.cuda.synchronize()
            prof.disable()
            st = pstats.Stats(prof)
            st.sort_stats("tottime").print_stats(40)
