"""Several GPUs: a Llama-3-8B-shaped model split over two GPUs with accelerate's device_map, with the
compressed cache, against the same model on one GPU. One process, one device call:

    python benches/multi_gpu.py --out DIR [--context 65536] [--new-tokens 128] [--layers 32]

The model is built once (random bf16 weights, ``gpu_bench.llama3_8b``). Each run prefills
``--context`` random tokens, then generates ``--new-tokens`` greedily from that cache:

* one GPU: the whole model on the first device, nexusquant ``balanced``, then bf16
  ``DynamicCache``, each ``--repeats`` times (timing spread; run-to-run logits);
* one GPU + hooks (control): accelerate's hooks with every module on the first device, nexusquant
  once, to tell what the hooks cost per decode step from what the second GPU costs;
* split: ``accelerate.dispatch_model`` with the embedding and the first half of the decoder layers
  on the first device, the rest with the final norm and the head on the second (what
  ``from_pretrained(device_map=...)`` does), the same runs as on one GPU.

Checked: the split runs' logits (prefill's last token, every decode step) and tokens against the
one-GPU runs'; every tensor of every compressed layer on its layer's device; and, from a profiled
short run of the split model (CUPTI kernel trace), on which GPU each nexusquant kernel ran, against
the layers each GPU holds. Measured: per-GPU peak ``torch.cuda.max_memory_allocated``, KV bytes per
GPU, prefill time, compression time (scoring + quantization of the prompt, CUDA events on each
layer's device), decode tokens/s. Writes multi_gpu.json and multi_gpu.md under --out.

``--smoke`` runs a tiny Llama on the CPU (both "devices" ``cpu``, accelerate's hooks forced) to
check the script itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nexusquant as nq  # noqa: E402
from nexusquant.architecture import attention_modules  # noqa: E402
from nexusquant.cache import NexusQuantLayer  # noqa: E402
from nexusquant.compat import output_cache, with_cache  # noqa: E402

# Relative tolerance on logits between the split and the one-GPU runs: max |difference| over the
# largest |logit|. Both runs execute the same kernels on the same kind of card in the same order,
# so the logits are expected bit-identical; 1e-3 is far below bf16's own step (2^-8 = 3.9e-3).
LOGIT_RTOL = 1e-3


def build_model(args):
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=512,
            max_position_embeddings=8192,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()
    from gpu_bench import llama3_8b

    return llama3_8b(args.layers)


def split_device_map(model, devices: list) -> dict:
    """Embedding and rotary angles on the first device, decoder layers in equal contiguous groups,
    final norm and head on the last (a pipeline split as ``device_map="balanced"`` makes one)."""
    n = model.config.num_hidden_layers
    dm = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    for i in range(n):
        dm[f"model.layers.{i}"] = devices[i * len(devices) // n]
    dm["model.norm"] = devices[-1]
    dm["lm_head"] = devices[-1]
    return dm


def split(model, devices: list, force_hooks: bool = False) -> dict:
    from accelerate import dispatch_model

    # Values as from_pretrained passes them: a GPU's index, or "cpu".
    dm = split_device_map(
        model, [torch.device(d).index or 0 if torch.device(d).type == "cuda" else "cpu" for d in devices]
    )
    # Exactly what transformers' from_pretrained(device_map=...) does: the cache argument is left
    # where it is; every other input of a layer is moved to the layer's device by a hook.
    dispatch_model(
        model,
        device_map=dm,
        skip_keys=model._skip_keys_device_placement,
        force_hooks=force_hooks or all(torch.device(d).type == "cpu" for d in devices),
    )
    return {k: str(v) for k, v in dm.items()}


def gpu_indices(devices) -> list[int]:
    return sorted({torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"})


def sync(devices) -> None:
    for i in gpu_indices(devices):
        torch.cuda.synchronize(i)


def allocated(gpus) -> dict:
    """GB allocated on each GPU now (weights, and the kernels' small tables and workspaces)."""
    gc.collect()
    return {f"cuda:{i}": torch.cuda.memory_allocated(i) / 1e9 for i in gpus}


def layer_devices(model) -> list[torch.device]:
    mods = sorted(attention_modules(model), key=lambda m: m.layer_idx)
    return [next(m.parameters()).device for m in mods]


def _layer_tensors(layer):
    for name in ("sink_k", "sink_v", "sink_seq", "sink_valid", "win_k", "win_v", "win_valid", "k_center", "v_center"):
        t = getattr(layer, name, None)
        if t is not None:
            yield name, t
    for tname in ("fine", "coarse"):
        tier = getattr(layer, tname, None)
        if tier is None:
            continue
        for part, qt in (("keys", tier.keys), ("values", tier.values)):
            for name in ("codes", "scales", "raw"):
                t = getattr(qt, name)
                if t is not None:
                    yield f"{tname}.{part}.{name}", t
        for name in ("seq", "valid"):
            t = getattr(tier, name)
            if t is not None:
                yield f"{tname}.{name}", t


def placement(cache, model) -> dict:
    """Where each layer's cache tensors are, against where the layer's weights are."""
    want = layer_devices(model)
    wrong, per_device = [], collections.Counter()
    kv_bytes = collections.Counter()
    codes_checked = 0
    for i, (layer, dev) in enumerate(zip(cache.layers, want)):
        per_device[str(dev)] += 1
        if isinstance(layer, NexusQuantLayer):
            kv_bytes[str(dev)] += layer.nbytes()
            if layer.device != dev:
                wrong.append(f"layer {i}: layer.device {layer.device}, weights on {dev}")
            for name, t in _layer_tensors(layer):
                codes_checked += name.endswith(".codes")
                if t.device != dev:
                    wrong.append(f"layer {i}: {name} on {t.device}, weights on {dev}")
        else:
            kv_bytes[str(dev)] += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
            if layer.keys.device != dev:
                wrong.append(f"layer {i}: keys on {layer.keys.device}, weights on {dev}")
    return dict(
        layers_per_device=dict(per_device),
        kv_bytes_per_device=dict(kv_bytes),
        wrong=wrong,
        code_tensors_checked=codes_checked,
    )


class CompressTimer:
    """GPU time of the prompt's compression (scoring, then compress) per device, with CUDA events
    recorded on each layer's device around the two calls: nothing is synchronized on the way."""

    def __init__(self):
        import nexusquant.attention as att

        self.att = att
        self.pairs: list = []
        self.active = False

    def __enter__(self):
        att, timer = self.att, self
        self.orig_scores, self.orig_compress = att._scores, NexusQuantLayer.compress

        def timed(fn, layer_of):
            def wrapper(*a, **k):
                layer = layer_of(a)
                if not timer.active or layer.device.type != "cuda":
                    return fn(*a, **k)
                stream = torch.cuda.current_stream(layer.device)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(stream)
                out = fn(*a, **k)
                e.record(stream)
                timer.pairs.append((str(layer.device), s, e))
                return out

            return wrapper

        att._scores = timed(self.orig_scores, lambda a: a[0])
        NexusQuantLayer.compress = timed(self.orig_compress, lambda a: a[0])
        return self

    def __exit__(self, *exc):
        self.att._scores = self.orig_scores
        NexusQuantLayer.compress = self.orig_compress
        return False

    def collect(self) -> dict:
        per = collections.Counter()
        for dev, s, e in self.pairs:
            e.synchronize()
            per[dev] += s.elapsed_time(e) / 1e3
        self.pairs.clear()
        return dict(per)


def run_once(model, ids, new_tokens, compressed: bool, devices, timer: CompressTimer) -> dict:
    """Prefill ``ids``, then generate ``new_tokens`` greedily from that cache."""
    gpus = gpu_indices(devices)
    gc.collect()
    for i in gpus:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(i)
    cm = nq.nexusquant_evict(model, quality="balanced") if compressed else _null()
    with cm as session, torch.no_grad():
        sync(devices)
        timer.active = compressed
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync(devices)
        prefill_s = time.perf_counter() - t0
        timer.active = False
        compress_s = timer.collect()
        cache = output_cache(out)
        prefill_logits = out.logits[:, -1].float().cpu()
        nxt = out.logits[:, -1:].argmax(-1)
        seq = torch.cat([ids, nxt.to(ids.device)], 1)
        del out
        t0 = time.perf_counter()
        gen = model.generate(
            seq,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **with_cache(model, cache),
        )
        sync(devices)
        decode_s = time.perf_counter() - t0
        fused = None
        if compressed:
            cache = session.cache
            fused = all(bool(l.last_view is not None and l.last_view.lazy_tiers) for l in cache.layers)
    place = placement(cache, model)
    row = dict(
        prefill_s=prefill_s,
        compress_s_per_device=compress_s,
        compress_s=sum(compress_s.values()),
        decode_s=decode_s,
        decode_tokens_per_s=(gen.sequences.shape[1] - seq.shape[1]) / decode_s,
        peak_GB_per_device={f"cuda:{i}": torch.cuda.max_memory_allocated(i) / 1e9 for i in gpus},
        kv_GB_per_device={k: v / 1e9 for k, v in place["kv_bytes_per_device"].items()},
        kv_GB=sum(place["kv_bytes_per_device"].values()) / 1e9,
        layers_per_device=place["layers_per_device"],
        misplaced=place["wrong"][:20],
        misplaced_count=len(place["wrong"]),
        code_tensors_checked=place["code_tensors_checked"],
        decode_read_codes_in_every_layer=fused,
    )
    logits = dict(
        prefill=prefill_logits,
        steps=torch.stack(gen.logits, 1).float().cpu(),
        tokens=gen.sequences[:, seq.shape[1] :].cpu(),
    )
    del cache, gen, session
    return row, logits


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def compare(a: dict, b: dict) -> dict:
    """Logit differences of run ``b`` against run ``a`` (prefill's last token and every decode step),
    and the first decode step whose logits differ at all (after a different greedy token the two
    runs continue from different sequences, so later differences say nothing more)."""
    res = {}
    for k in ("prefill", "steps"):
        x, y = a[k], b[k]
        diff = (x - y).abs().max().item()
        scale = x.abs().max().item()
        res[k] = dict(
            max_abs_diff=diff,
            max_abs_logit=scale,
            rel=diff / scale if scale else 0.0,
            bit_identical=bool(torch.equal(x, y)),
        )
    same = a["tokens"].shape == b["tokens"].shape and bool(torch.equal(a["tokens"], b["tokens"]))
    res["tokens_identical"] = same
    res["within_tolerance"] = same and all(res[k]["rel"] <= LOGIT_RTOL for k in ("prefill", "steps"))
    x, y = a["steps"], b["steps"]  # (B, steps, vocab)
    per_step = (x - y).abs().amax(dim=(0, 2))
    differing = torch.nonzero(per_step).flatten()
    if differing.numel():
        i = int(differing[0])
        top = x[:, i].topk(2, dim=-1).values
        res["first_differing_step"] = dict(
            step=i,
            max_abs_diff=per_step[i].item(),
            greedy_token_same=bool(torch.equal(x[:, i].argmax(-1), y[:, i].argmax(-1))),
            top2_margin=(top[:, 0] - top[:, 1]).min().item(),
            tokens_same_before=bool(torch.equal(a["tokens"][:, :i], b["tokens"][:, :i])),
        )
    return res


def kernel_placement(model, devices, context: int) -> dict:
    """A short compressed run of the split model under the profiler: the nexusquant kernels
    (``nq_*``) counted per GPU from the CUPTI trace, against the layers each GPU holds."""
    if not gpu_indices(devices):
        return dict(skipped="no GPU")
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size - 256, (1, context), device=devices[0])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with nq.nexusquant_evict(model, quality="balanced"), torch.no_grad():
            model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        sync(devices)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        trace = json.loads(Path(path).read_text())
    counts: dict = collections.defaultdict(collections.Counter)
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") != "kernel" or not str(ev.get("name", "")).startswith("nq_"):
            continue
        dev = (ev.get("args") or {}).get("device")
        counts[ev["name"]][f"cuda:{dev}"] += 1
    layers = collections.Counter(str(d) for d in layer_devices(model))
    total_layers = sum(layers.values())
    ok = bool(counts)
    for per in counts.values():
        total = sum(per.values())
        for dev, n_layers in layers.items():
            if per.get(dev, 0) * total_layers != total * n_layers:
                ok = False
    return dict(
        context=context,
        new_tokens=3,
        kernels={k: dict(v) for k, v in counts.items()},
        layers_per_device=dict(layers),
        proportional_to_layers=ok,
    )


def tables(res: dict) -> str:
    e = res
    lines = [
        f"Measured on {e['device_name']} x{e['gpus']} ({e['date']}), `{e['command']}`; torch {e['torch']}, "
        f"transformers {e['transformers']}, accelerate {e['accelerate']}.",
        "",
        f"Llama-3-8B-shaped ({e['layers']} layers), random bf16 weights ({e['weights_GB']:.1f} GB), batch 1, "
        f"prefill {e['context']:,} tokens, then {e['new_tokens']} greedy tokens. Split: "
        f"`accelerate.dispatch_model`, layers 0–{e['layers'] // 2 - 1} with the embedding on cuda:0, "
        f"layers {e['layers'] // 2}–{e['layers'] - 1} with norm and head on cuda:1.",
        "",
        "Allocated before the runs (weights, kernel tables): "
        + "; ".join(
            f"{k}: " + ", ".join(f"{d} {v:.1f} GB" for d, v in a.items())
            for k, a in e.get("allocated_GB_before_runs", {}).items()
        )
        + ".",
        "",
        "| placement | cache | peak GB cuda:0 | peak GB cuda:1 | KV GB (cuda:0 + cuda:1) | prefill s | "
        "compress s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in e["rows"]:
        if "error" in r:
            lines.append(f"| {r['placement']} | {r['cache']} | failed: {r['error'][:100]} | | | | | |")
            continue
        pk = r["peak_GB_per_device"]
        kv = r["kv_GB_per_device"]
        kv_s = " + ".join(f"{kv.get(d, 0.0):.2f}" for d in ("cuda:0", "cuda:1")) if len(kv) > 1 else f"{r['kv_GB']:.2f}"
        comp = f"{r['compress_s']:.2f}" if r["cache"].startswith("nexusquant") else "–"
        lines.append(
            f"| {r['placement']} | {r['cache']}{' #' + str(r['repeat']) if r.get('repeat') else ''} | "
            f"{pk.get('cuda:0', 0):.1f} | {pk.get('cuda:1', 0):.1f} | {kv_s} | {r['prefill_s']:.2f} | "
            f"{comp} | {r['decode_tokens_per_s']:.1f} |"
        )
    lines.append("")
    for name, c in e.get("comparisons", {}).items():
        if "error" in c:
            lines.append(f"- {name}: {c['error']}")
            continue
        lines.append(
            f"- {name}: tokens identical {c['tokens_identical']}; "
            f"prefill logits max |Δ| {c['prefill']['max_abs_diff']:.3g} "
            f"(bit-identical {c['prefill']['bit_identical']}); decode logits max |Δ| {c['steps']['max_abs_diff']:.3g} "
            f"over {e['new_tokens']} steps (bit-identical {c['steps']['bit_identical']}); "
            f"within tolerance (max |Δ| ≤ {LOGIT_RTOL:g} × max |logit|): {c['within_tolerance']}"
            + (
                f"; first differing decode step {c['first_differing_step']['step']} (max |Δ| "
                f"{c['first_differing_step']['max_abs_diff']:.3g}, top-2 logit margin there "
                f"{c['first_differing_step']['top2_margin']:.3g}, same greedy token "
                f"{c['first_differing_step']['greedy_token_same']})"
                if "first_differing_step" in c
                else ""
            )
            + "."
        )
    for r in e["rows"]:
        if r.get("cache", "").startswith("nexusquant") and "error" not in r and r["placement"] == "split":
            lines.append(
                f"- Placement ({r['placement']}, repeat {r.get('repeat', 1)}): layers per device "
                f"{r['layers_per_device']}; {r['code_tensors_checked']} code tensors and every other cache "
                f"tensor checked, {r['misplaced_count']} off their layer's device; decode read the codes "
                f"(fused kernel) in every layer: {r['decode_read_codes_in_every_layer']}."
            )
    kp = e.get("kernel_placement")
    if kp and "kernels" in kp:
        per = "; ".join(f"`{k}` {v}" for k, v in sorted(kp["kernels"].items()))
        lines.append(
            f"- Kernels per GPU (profiled split run, prefill {kp['context']} + {kp['new_tokens']} tokens): "
            f"{per}; layers per GPU {kp['layers_per_device']}; counts proportional to the layers: "
            f"{kp['proportional_to_layers']}."
        )
    elif kp:
        lines.append(f"- Kernels per GPU: {kp}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs of each configuration: timing spread and run-to-run logits"
    )
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--profile-context", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    devices = args.devices.split(",") if not args.smoke else ["cpu", "cpu"]
    import accelerate
    import transformers

    gpus = gpu_indices(devices)
    if gpus:
        assert len(gpus) >= 2 and torch.cuda.device_count() >= 2, "needs two GPUs"
        from nexusquant import gpu

        assert gpu.available(devices[0]) and gpu.available(devices[1]), "CUDA kernels unavailable"
    res = dict(
        device_name=torch.cuda.get_device_name(gpus[0]) if gpus else platform.processor() or "cpu",
        gpus=len(gpus),
        date=str(date.today()),
        torch=torch.__version__,
        transformers=transformers.__version__,
        accelerate=accelerate.__version__,
        host=platform.node(),
        context=args.context,
        new_tokens=args.new_tokens,
        layers=args.layers,
        logit_rtol=LOGIT_RTOL,
        command="python benches/multi_gpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        rows=[],
        comparisons={},
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "multi_gpu.json").write_text(json.dumps(res, indent=2))
        md = tables(res)
        (out / "multi_gpu.md").write_text(md + "\n")
        return md

    model = build_model(args)
    model.to(devices[0])
    res["weights_GB"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 256, (1, args.context), generator=g).to(devices[0])
    warm = ids[:, : min(2048, args.context)]
    timer = CompressTimer().__enter__()
    logits: dict = {}

    def measure(placement, label, compressed, repeats):
        for rep in range(1, repeats + 1):
            try:
                row, lg = run_once(model, ids, args.new_tokens, compressed, devices, timer)
                logits[(placement, label, rep)] = lg
            except Exception as e:  # record and go on: one failing row must not lose the others
                import traceback

                traceback.print_exc()
                row = dict(error=f"{type(e).__name__}: {e}")
            row.update(placement=placement, cache=label, repeat=rep if repeats > 1 else None)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()

    try:
        # Warm-up (NVRTC compiles, cuBLAS handles) outside every timed run, on each placement.
        run_once(model, warm, 4, True, devices, timer)
        res["allocated_GB_before_runs"] = {"one GPU": allocated(gpus)}
        measure("one GPU", "nexusquant balanced", True, args.repeats)
        measure("one GPU", "bf16 DynamicCache", False, args.repeats)
        # Control: accelerate's hooks with every module on the first device, to tell what the hooks
        # cost per decode step from what splitting over two GPUs costs.
        split(model, [devices[0]] * len(devices), force_hooks=True)
        run_once(model, warm, 4, True, devices, timer)
        measure("one GPU + hooks", "nexusquant balanced", True, 1)
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(model)
        res["device_map"] = split(model, devices)
        run_once(model, warm, 4, True, devices, timer)
        res["allocated_GB_before_runs"]["split"] = allocated(gpus)
        try:
            res["kernel_placement"] = kernel_placement(model, devices, min(args.profile_context, args.context))
        except Exception as e:
            import traceback

            traceback.print_exc()
            res["kernel_placement"] = dict(error=f"{type(e).__name__}: {e}")
        print(json.dumps(res["kernel_placement"]), flush=True)
        measure("split", "nexusquant balanced", True, args.repeats)
        measure("split", "bf16 DynamicCache", False, args.repeats)
    finally:
        timer.__exit__()
        pairs = []
        for label in ("nexusquant balanced", "bf16 DynamicCache"):
            pairs.append((f"split vs one GPU, {label}", ("one GPU", label, 1), ("split", label, 1)))
            for placement in ("one GPU", "split"):
                if args.repeats > 1:
                    pairs.append((f"run to run ({placement}), {label}", (placement, label, 1), (placement, label, 2)))
        for name, ka, kb in pairs:
            a, b = logits.get(ka), logits.get(kb)
            res["comparisons"][name] = (
                compare(a, b) if a is not None and b is not None else dict(error="a run failed: nothing to compare")
            )
        a, b = logits.get(("one GPU", "nexusquant balanced", 1)), logits.get(("one GPU", "bf16 DynamicCache", 1))
        if a is not None and b is not None:  # context only: how far compression moves the logits
            c = compare(b, a)
            res["nexusquant_vs_bf16_one_gpu"] = dict(
                prefill_bit_identical=c["prefill"]["bit_identical"],
                decode_max_abs_diff=c["steps"]["max_abs_diff"],
                tokens_identical=c["tokens_identical"],
            )
        print(save())


if __name__ == "__main__":
    main()
