"""Where a decode step's time goes, one GPU against a model split over two (accelerate device_map).

    python benches/split_decode_profile.py     # needs two GPUs; prints, writes nothing

Llama-3-8B-shaped random bf16 model (gpu_bench.llama3_8b), prefill 8,192 tokens, then plain
forward decode steps, nexusquant balanced and bf16 DynamicCache, on cuda:0 and then split as
benches/multi_gpu.py splits it. Per step: host time to enqueue it (no synchronization), the same
with the GPUs drained at the end, with a sync after every step (as generate does), GPU time of
kernels and copies per device (CUPTI trace), and the profiler's CPU table. Output of the run in
docs/GPU.md: benches/results/split_decode_profile.log.
"""

import sys
import time

import torch

sys.path.insert(0, "benches")
import multi_gpu as mg
from gpu_bench import llama3_8b
from torch.profiler import ProfilerActivity, profile

import nexusquant as nq
from nexusquant.compat import output_cache, with_cache

print("p2p", torch.cuda.can_device_access_peer(0, 1), torch.cuda.can_device_access_peer(1, 0), flush=True)
model = llama3_8b(32)
ids = torch.randint(0, 128000, (1, 8192), device="cuda:0")


def sync():
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)


def gpu_time(prof, steps):
    import collections
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "t.json")
        prof.export_chrome_trace(f)
        tr = json.load(open(f))
    per = collections.Counter()
    for e in tr.get("traceEvents", []):
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            per[f"cuda:{(e.get('args') or {}).get('device')} {e['cat']}"] += e.get("dur", 0) / 1e3 / steps
    return {k: round(v, 2) for k, v in sorted(per.items())}


def run(label, compressed, n=60):
    with nq.nexusquant_evict(model) if compressed else mg._null(), torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        tok = out.logits[:, -1:].argmax(-1).to("cuda:0")

        def step(t):
            return model(t, use_cache=True, **with_cache(model, cache)).logits[:, -1:].argmax(-1).to("cuda:0")

        for _ in range(3):
            tok = step(tok)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            tok = step(tok)
        host_only = (time.perf_counter() - t0) / n
        sync()
        pipelined = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(n):
            tok = step(tok)
            tok.item()
        synced = (time.perf_counter() - t0) / n
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                tok = step(tok)
                tok.item()
    print(
        f"== {label} {'nexusquant' if compressed else 'bf16'}: host enqueue {host_only * 1e3:.1f} ms/step, "
        f"pipelined {pipelined * 1e3:.1f}, synced each step {synced * 1e3:.1f}; GPU time per step (kernels, copies) "
        f"{gpu_time(prof, 5)}",
        flush=True,
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14), flush=True)


run("one GPU", True)
run("one GPU", False)
mg.split(model, ["cuda:0", "cuda:1"])
run("split", True)
run("split", False)
