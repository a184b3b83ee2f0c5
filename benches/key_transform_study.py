"""Which key coder, at which bits: a fast simulated write-back study on a real model.

    python benches/key_transform_study.py --model smollm2 --prefix 1024 --continuation 128 \
        --text alice29 lcet10 decode.c --out study.jsonl  VARIANT ...

Each VARIANT is ``keys:values`` with keys one of ``fp``, ``e8-<bits>`` (the shipped per-vector
Hadamard + E8 code, keys centred per head) or ``pca-<bits per element>[-pre][-w][-x<fraction>]``
(the transform coder of ``nexusquant.transform``; ``-pre``: RoPE undone first; ``-w``: in the
metric of the prefill's queries, as the product fits it; ``-x0.03``: the 3% of tokens the basis
codes worst, by error in that metric, get 3-bit E8 codes instead), or ``pcag-...``: the same with one
water level for all layers (a Lagrange multiplier found by bisection so that all layers together
hold the rate; ``pca-`` gives each layer the rate). Two more key suffixes use the attention the
prompt's last 32 queries pay each token (averaged over them, summed over heads): ``-aw<floor>``
weighs the tokens in the fit by it plus ``floor`` times the even weight (``-aw1``: half and half,
the product's ``key_attention_share=0.5``; ``-aw1p``: the attention pooled over 7 neighbours first,
as the eviction scorer gives it), ``-a<fraction>``: the most attended tokens keep 4-bit E8 codes;
``-ph``: one basis per KV head instead of one for all heads side by side.
Values ``fp``, ``e8-<bits>``, ``pca-<bits per element>[-o]`` (the same transform coder on the
values of all KV heads side by side; ``-o``: in the metric of the output projection,
``sum_j W_o,j^T W_o,j`` over the query heads ``j`` of each KV group, since a value error reaches
the residual stream through ``W_o``), or E8 codes whose width follows attention:
``e8a-<hi>-<lo>-<fraction>`` (per KV head, the most attended ``fraction`` of tokens at ``hi``
bits, the rest at ``lo``), ``e8w-<mean bits>-<min bits>`` (per token and head, widths from
``min`` to 4 by greedy allocation on mean_q p² |v - mean|², the expected squared output error,
all heads of a layer sharing the budget), ``e8t-<hi>-<lo>-<fraction>`` (as ``e8a``, the same tokens
in every head), ``e8r-<lo>-<refine>-<fraction>`` (every token at ``lo`` bits, the most attended
``fraction`` per head also get that code's error E8-coded at ``refine`` bits),
``e8L-<mean bits>`` / ``e8H-<mean bits>`` (one width per layer / per layer and head, all layers
sharing the budget, on the measured attention-weighted error).

For each text: the prefix is prefilled once (fp32 model); for each variant the prefix's keys and
values, except the first 4 (sinks) and the last 16 (window), are replaced by their decoded codes in
a copy of the cache, and the next ``C`` tokens are scored teacher-forced in one forward over that
copy. PPL delta is against the same forward over the unmodified cache; KL is the mean
KL(uncompressed || coded) of the next-token distributions over the continuation, far less noisy.
Bits are bytes actually held by the codes (basis, means, steps and scales included) per
compressed element; ``ratio`` is the whole prefix cache's fp16 bytes over what it would hold
(sinks and window in fp16). This is a study tool: the product's numbers come from
``nexusquant eval``, which runs the real cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

SINKS, WINDOW = 4, 16


def load(model_name: str):
    from nexusquant.eval.models import load_model

    return load_model(model_name, dtype="float32")


def prefix_cache(model, ids: torch.Tensor):
    """Last logits, the cache, and each layer's pre-RoPE queries ``(1, H_q, T, D)``."""
    from transformers import DynamicCache

    queries = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def grab(mod, inp, out, i=i, attn=attn):
            b, t, _ = out.shape
            queries[i] = out.detach().reshape(b, t, -1, attn.head_dim).transpose(1, 2)

        hooks.append(attn.q_proj.register_forward_hook(grab))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    for h in hooks:
        h.remove()
    return out.logits[0, -1].float(), cache, queries


def query_moment(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """Block-diagonal ``(F, F)`` second moment of the queries, summed over each KV group."""
    _, hq, t, d = q.shape
    g = hq // hkv
    m = torch.zeros(hkv * d, hkv * d)
    for h in range(hkv):
        qq = q[0, h * g : (h + 1) * g].reshape(-1, d).float()
        m[h * d : (h + 1) * d, h * d : (h + 1) * d] = qq.T @ qq / t
    return m


def rope_angles(model, n: int):
    pos = torch.arange(n)[None]
    dummy = torch.zeros(1, n, model.config.head_dim if hasattr(model.config, "head_dim") else 64)
    cos, sin = model.model.rotary_emb(dummy, pos)
    return cos, sin


def undo_redo(model, k: torch.Tensor, cos, sin, inverse: bool) -> torch.Tensor:
    import importlib

    mod = importlib.import_module(type(model.model.layers[0].self_attn).__module__)
    s = -sin if inverse else sin
    _, out = mod.apply_rotary_pos_emb(k, k, cos, s)
    return out


def code_keys(
    spec: str, k: torch.Tensor, model, cos, sin, q_pre=None, q_post=None, lagrange=None, attention=None
) -> tuple[torch.Tensor, int]:
    """Decoded keys ``(1, H, T, D)`` and the bytes the code holds."""
    from nexusquant.tables import get_codec
    from nexusquant.tiers import decode_tensor, encode_tensor
    from nexusquant.transform import fit_key_transform

    b, h, t, d = k.shape
    if spec == "fp":
        return k, k.numel() * 2
    if spec.startswith("e8-"):
        bits = int(spec[3:])
        center = k.mean(2, keepdim=True)
        codec = get_codec(d, bits, 0)
        codes, scales = encode_tensor(codec, k - center)
        out = decode_tensor(codec, codes, scales, torch.float32) + center
        return out, codes.numel() + scales.numel() * 2 + center.numel() * 2
    if spec.startswith(("pca-", "pcag-")):
        parts = spec.split("-")
        rate = float(parts[1])
        pre = "pre" in parts[2:]
        x = k
        if pre:
            x = undo_redo(model, k, cos, sin, inverse=True)
        flat = x[0].permute(1, 0, 2).reshape(t, h * d)
        m = None
        if "w" in parts[2:]:
            m = query_moment(q_pre if pre else q_post, h)
        weighted = [p for p in parts[2:] if p.startswith("aw")]
        token_weight = None
        if weighted:
            # ``-aw<floor>``: tokens weighted in the fit by the last queries' attention plus
            # ``floor`` times the uniform weight (a token nobody looks at still counts a little).
            pooled = weighted[0].endswith("p")
            floor = float(weighted[0][2:].rstrip("p"))
            a = attention
            if pooled:
                # pooled over 7 neighbours, as the product's query scorer gives it
                a = torch.nn.functional.avg_pool1d(a[None, None], 7, 1, 3, count_include_pad=False)[0, 0]
            a = a / a.sum()
            capped = [p for p in parts[2:] if p.startswith("cap")]
            if capped:
                # ``-cap<c>``: no token weighs more than ``c`` times the mean attention
                a = a.clamp(max=float(capped[0][3:]) / a.numel())
                a = a / a.sum()
            token_weight = (a + floor / a.numel()) * a.numel() / (1 + floor)
        if "ph" in parts[2:]:
            # ``-ph``: one basis per KV head (``head_dim`` wide) instead of one for the heads side by
            # side: a decode kernel then rebuilds K x head_dim per token and head, not K x F.
            dec_parts, nbytes = [], 0
            for j in range(h):
                sl = slice(j * d, (j + 1) * d)
                mj = None if m is None else m[sl, sl]
                cj = fit_key_transform(flat[:, sl], rate, valid=token_weight, query_moment=mj, lagrange=lagrange)
                nbytes += cj.nbytes()
                dec_parts.append(cj.decode().float())
            dec_flat = torch.cat(dec_parts, 1)
            dec = dec_flat.reshape(t, h, d).permute(1, 0, 2)[None]
            if pre:
                dec = undo_redo(model, dec, cos, sin, inverse=False)
            return dec, nbytes
        code = fit_key_transform(flat, rate, valid=token_weight, query_moment=m, lagrange=lagrange)
        nbytes = code.nbytes()
        dec_flat = code.decode().float()
        top = [p for p in parts[2:] if p.startswith("a") and not p.startswith("aw")]
        if top:
            # ``-a<fraction>``: the tokens the last queries attend to most keep 4-bit E8 codes.
            frac = float(top[0][1:])
            n_top = int(round(frac * t))
            chosen = torch.topk(attention, n_top).indices
            per_head = x[0].permute(1, 0, 2)[chosen]
            center = x[0].mean(1, keepdim=True).permute(1, 0, 2)
            codec = get_codec(d, 4, 0)
            codes, scales = encode_tensor(codec, (per_head - center)[None])
            dec_flat[chosen] = (decode_tensor(codec, codes, scales, torch.float32)[0] + center).reshape(n_top, h * d)
            nbytes += codes.numel() + scales.numel() * 2 - n_top * code.codes.shape[1]
        outliers = [p for p in parts[2:] if p.startswith("x")]
        if outliers:
            # ``-x<fraction>``: the tokens the basis codes worst (largest error in the query metric,
            # i.e. logit error energy) get the per-vector E8 code at ``e8_bits`` instead.
            frac, e8_bits = float(outliers[0][1:]), 3
            err = flat.float() - dec_flat
            metric = m.float() if m is not None else torch.eye(h * d)
            energy = ((err @ metric) * err).sum(1)
            n_out = int(round(frac * t))
            worst = torch.topk(energy, n_out).indices
            per_head = x[0].permute(1, 0, 2)[worst]  # (n_out, H, D)
            center = x[0].mean(1, keepdim=True).permute(1, 0, 2)  # (1, H, D)
            codec = get_codec(d, e8_bits, 0)
            codes, scales = encode_tensor(codec, (per_head - center)[None])
            e8 = decode_tensor(codec, codes, scales, torch.float32)[0] + center
            dec_flat[worst] = e8.reshape(n_out, h * d)
            nbytes += codes.numel() + scales.numel() * 2 - n_out * code.codes.shape[1]
        dec = dec_flat.reshape(t, h, d).permute(1, 0, 2)[None]
        if pre:
            dec = undo_redo(model, dec, cos, sin, inverse=False)
        return dec, nbytes
    raise SystemExit(f"unknown key spec {spec!r}")


def output_metric(attn, hkv: int, d: int) -> torch.Tensor:
    """Block-diagonal ``(F, F)``: per KV head, ``sum_j W_o,j^T W_o,j`` over its query heads ``j``."""
    w = attn.o_proj.weight.detach().float()  # (hidden, H_q * d)
    hq = w.shape[1] // d
    g = hq // hkv
    m = torch.zeros(hkv * d, hkv * d)
    for h in range(hkv):
        for j in range(h * g, (h + 1) * g):
            wj = w[:, j * d : (j + 1) * d]
            m[h * d : (h + 1) * d, h * d : (h + 1) * d] += wj.T @ wj
    return m / g


def attention_scores(k: torch.Tensor, q_post: torch.Tensor, window: int = 32, power: int = 1) -> torch.Tensor:
    """``(H_kv, T)``: attention of the prompt's last ``window`` queries to each key, averaged over
    those queries and each KV head's query group (causal)."""
    _, hkv, t, d = k.shape
    hq = q_post.shape[1]
    g = hq // hkv
    q = q_post[0, :, t - window :].float()  # (Hq, W, D)
    kk = k[0].float().repeat_interleave(g, 0)  # (Hq, T, D)
    s = q @ kk.transpose(1, 2) / math.sqrt(d)
    pos = torch.arange(t - window, t)[:, None]
    s = s.masked_fill(torch.arange(t)[None, :] > pos, float("-inf"))
    p = s.softmax(-1).pow(power).mean(1)  # (Hq, T)
    return p.reshape(hkv, g, t).mean(1)


def code_values(spec: str, v: torch.Tensor, attn=None, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    from nexusquant.tables import get_codec
    from nexusquant.tiers import decode_tensor, encode_tensor
    from nexusquant.transform import fit_key_transform

    if spec == "fp":
        return v, v.numel() * 2
    if spec.startswith("e8w-"):
        # ``e8w-<mean bits>-<min bits>``: bits per token (min..4) by greedy water-filling on each
        # token's expected squared output error, mean_q p_qt^2 * |v_t - mean|^2 (all KV heads of the
        # layer share the budget): a bit divides a vector's error by about 4.
        _, avg_b, min_b = spec.split("-")
        assert scores is not None
        lo_bits, max_bits = int(min_b), 4
        center = v.mean(2, keepdim=True)
        w = scores.double() * (v - center)[0].double().pow(2).sum(-1)  # (H, T)
        h, t = w.shape
        extra = int(round((float(avg_b) - lo_bits) * h * t))
        steps = max_bits - lo_bits
        gains = w.reshape(-1, 1) * torch.tensor([4.0 ** -(lo_bits + j) * 0.75 for j in range(steps)]).double()
        bits = torch.full((h * t,), lo_bits, dtype=torch.int64)
        if extra > 0:
            top = torch.topk(gains.reshape(-1), min(extra, gains.numel())).indices
            bits.scatter_add_(0, top // steps, torch.ones_like(top))
        bits = bits.reshape(h, t)
        out = torch.empty_like(v, dtype=torch.float32)
        nbytes = center.numel() * 2
        for b in range(lo_bits, max_bits + 1):
            mask = bits == b
            sel = (v - center)[0][mask]
            if sel.shape[0] == 0:
                continue
            codec = get_codec(v.shape[-1], b, 0)
            codes, sc = encode_tensor(codec, sel[None, None])
            out[0][mask] = decode_tensor(codec, codes, sc, torch.float32)[0, 0] + center[0].expand_as(v[0])[mask]
            nbytes += codes.numel() + sc.numel() * 2
        return out, nbytes
    if spec.startswith("e8r-"):
        # ``e8r-<lo>-<refine>-<fraction>``: every token at ``lo`` bits, and per KV head the most
        # attended ``fraction`` also get the error of that code E8-coded at ``refine`` bits (a
        # sparse refinement: a decode kernel reads the uniform code as now, plus a short list).
        _, lo_b, r_b, frac = spec.split("-")
        assert scores is not None
        center = v.mean(2, keepdim=True)
        x = v - center
        codec = get_codec(v.shape[-1], int(lo_b), 0)
        codes, sc = encode_tensor(codec, x)
        base = decode_tensor(codec, codes, sc, torch.float32)
        nbytes = center.numel() * 2 + codes.numel() + sc.numel() * 2
        t = v.shape[2]
        n_hi = int(round(float(frac) * t))
        if n_hi:
            top = torch.topk(scores, n_hi, dim=1).indices  # (H, n)
            res = (x - base)[0].gather(1, top[..., None].expand(-1, -1, v.shape[-1]))
            rcodec = get_codec(v.shape[-1], int(r_b), 1)
            rc, rs = encode_tensor(rcodec, res[None])
            fix = decode_tensor(rcodec, rc, rs, torch.float32)[0]
            base[0].scatter_add_(1, top[..., None].expand(-1, -1, v.shape[-1]), fix)
            nbytes += rc.numel() + rs.numel() * 2 + top.numel() * 2  # int16 token index per entry
        return base + center, nbytes
    if spec.startswith("e8t-"):
        # ``e8t-<hi>-<lo>-<fraction>``: as ``e8a`` with the same tokens in every KV head (attention
        # summed over heads), the way a transform-coded tier holds tokens.
        _, hi_b, lo_b, frac = spec.split("-")
        assert scores is not None
        return code_values(f"e8a-{hi_b}-{lo_b}-{frac}", v, attn, scores.sum(0, keepdim=True).expand_as(scores))
    if spec.startswith("e8a-"):
        # ``e8a-<hi>-<lo>-<fraction>``: per KV head, the ``fraction`` of tokens the last queries
        # attend to most get ``hi``-bit E8 codes, the rest ``lo`` bits.
        _, hi_b, lo_b, frac = spec.split("-")
        assert scores is not None
        center = v.mean(2, keepdim=True)
        out = torch.empty_like(v, dtype=torch.float32)
        nbytes = center.numel() * 2
        t = v.shape[2]
        n_hi = int(round(float(frac) * t))
        hi_mask = torch.zeros(v.shape[1], t, dtype=torch.bool)
        if n_hi:
            hi_mask.scatter_(1, torch.topk(scores, n_hi, dim=1).indices, True)
        for bits, mask in ((int(hi_b), hi_mask), (int(lo_b), ~hi_mask)):
            codec = get_codec(v.shape[-1], bits, 0)
            sel = (v - center)[0][mask]  # (N, D)
            if sel.shape[0] == 0:
                continue
            codes, sc = encode_tensor(codec, sel[None, None])
            out[0][mask] = decode_tensor(codec, codes, sc, torch.float32)[0, 0] + center[0].expand_as(v[0])[mask]
            nbytes += codes.numel() + sc.numel() * 2
        return out, nbytes
    if spec.startswith("pca-"):
        parts = spec.split("-")
        b, h, t, d = v.shape
        flat = v[0].permute(1, 0, 2).reshape(t, h * d)
        m = output_metric(attn, h, d) if "o" in parts[2:] else None
        code = fit_key_transform(flat, float(parts[1]), query_moment=m)
        return code.decode().reshape(t, h, d).permute(1, 0, 2)[None], code.nbytes()
    bits = int(spec.split("-")[1])
    center = v.mean(2, keepdim=True)
    codec = get_codec(v.shape[-1], bits, 0)
    codes, scales = encode_tensor(codec, v - center)
    return decode_tensor(
        codec, codes, scales, torch.float32
    ) + center, codes.numel() + scales.numel() * 2 + center.numel() * 2


def common_water_level(model, cache, kspec: str, cos, sin, queries) -> float:
    """``pcag-<rate>...``: one Lagrange multiplier for all layers (a common water level, so a bit
    buys the same query-metric error in every layer), found by bisection so that the keys of all
    layers together hold ``rate`` bits per element, as ``pca-<rate>`` holds in each layer."""
    rate = float(kspec.split("-")[1])
    pre = "pre" in kspec.split("-")[2:]

    def total_bits(lam: float) -> tuple[float, int]:
        held = elems = 0
        for i, layer in enumerate(cache.layers):
            k = layer.keys
            lo, hi = SINKS, k.shape[2] - WINDOW
            q = queries[i] if pre else undo_redo(model, queries[i], cos, sin, inverse=False)
            _, nb = code_keys(kspec, k[:, :, lo:hi], model, cos[:, lo:hi], sin[:, lo:hi], q, q, lagrange=lam)
            held += 8 * nb
            elems += k[:, :, lo:hi].numel()
        return held, elems

    lo_l, hi_l = -12.0, 6.0  # log10 of the multiplier
    for _ in range(18):
        mid = (lo_l + hi_l) / 2
        held, elems = total_bits(10**mid)
        if held > rate * elems:
            lo_l = mid  # too many bits: raise the water level
        else:
            hi_l = mid
    return 10**hi_l


def value_unit_bits(model, cache, vspec: str, cos, sin, queries) -> dict:
    """``e8L-<mean bits>`` / ``e8H-<mean bits>``: one E8 value width (2-4 bits) per layer / per
    layer and KV head, for all layers together, by greedy allocation on the measured error each
    width leaves, weighted by the prompt's last queries' squared attention (the output error)."""
    from nexusquant.tables import get_codec
    from nexusquant.tiers import decode_tensor, encode_tensor

    per_head = vspec.startswith("e8H-")
    avg = float(vspec.split("-")[1])
    units = []  # (key, weighted error at 2, 3, 4 bits, elements)
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        lo, hi = SINKS, k.shape[2] - WINDOW
        q_post = undo_redo(model, queries[i], cos, sin, inverse=False)
        w = attention_scores(k, q_post, power=2)[:, lo:hi].double()  # (H, T)
        x = v[:, :, lo:hi]
        center = x.mean(2, keepdim=True)
        errs = []
        for b in (2, 3, 4):
            codec = get_codec(x.shape[-1], b, 0)
            codes, sc = encode_tensor(codec, x - center)
            e = (decode_tensor(codec, codes, sc, torch.float32) + center - x)[0].double().pow(2).sum(-1)
            errs.append((w * e).sum(-1))  # (H,)
        errs_t = torch.stack(errs, 1)  # (H, 3)
        if per_head:
            for h in range(errs_t.shape[0]):
                units.append(((i, h), errs_t[h], x.shape[2] * x.shape[3]))
        else:
            units.append(((i, None), errs_t.sum(0), x[0].numel()))
    total = sum(u[2] for u in units)
    budget = (avg - 2) * total  # extra element-bits above 2 bits everywhere
    bits = {u[0]: 2 for u in units}
    cand = []
    for key, e, n in units:
        for j in range(2):
            cand.append(((float(e[j] - e[j + 1])) / n, j, key, n))
    cand.sort(key=lambda c: -c[0])
    spent = 0
    for _gain, j, key, n in cand:
        if spent + n > budget or bits[key] != 2 + j:
            continue  # over the budget, or the width below this step was not bought
        bits[key] += 1
        spent += n
    return bits


def run_variant(model, cache, cont_ids, spec: str, prefix: int, cos, sin, queries=None):
    from transformers import DynamicCache

    kspec, vspec = spec.split(":")
    unit_bits = value_unit_bits(model, cache, vspec, cos, sin, queries) if vspec.startswith(("e8L-", "e8H-")) else None
    lagrange = common_water_level(model, cache, kspec, cos, sin, queries) if kspec.startswith("pcag-") else None
    new = DynamicCache(config=model.config)
    held = fp16 = 0
    kbytes = kel = vbytes = 0
    layer_bits: list[float] = []
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        n = k.shape[2]
        lo, hi = SINKS, n - WINDOW
        q_pre = q_post = None
        if queries is not None:
            q_pre = queries[i]
            q_post = undo_redo(model, q_pre, cos, sin, inverse=False)
        key_attention = None
        if "-a" in kspec and q_post is not None:
            key_attention = attention_scores(k, q_post).sum(0)[lo:hi]
        kc, kb = code_keys(
            kspec, k[:, :, lo:hi], model, cos[:, lo:hi], sin[:, lo:hi], q_pre, q_post, lagrange, key_attention
        )
        scores = None
        if vspec.startswith(("e8a-", "e8w-", "e8t-", "e8r-")) and q_post is not None:
            scores = attention_scores(k, q_post, power=2 if vspec.startswith("e8w-") else 1)[:, lo:hi]
        if unit_bits is not None:
            if vspec.startswith("e8L-"):
                vc, vb = code_values(f"e8-{unit_bits[(i, None)]}", v[:, :, lo:hi])
            else:
                parts = [code_values(f"e8-{unit_bits[(i, h)]}", v[:, h : h + 1, lo:hi]) for h in range(v.shape[1])]
                vc, vb = torch.cat([p[0] for p in parts], 1), sum(p[1] for p in parts)
        else:
            vc, vb = code_values(vspec, v[:, :, lo:hi], model.model.layers[i].self_attn, scores)
        k2 = torch.cat([k[:, :, :lo], kc.to(k.dtype), k[:, :, hi:]], 2)
        v2 = torch.cat([v[:, :, :lo], vc.to(v.dtype), v[:, :, hi:]], 2)
        new.update(k2, v2, i)
        fpb = 2 * (k.numel() - kc.numel()) * 2
        held += kb + vb + fpb
        fp16 += 2 * k.numel() * 2
        kbytes += kb
        layer_bits.append(round(8 * kb / kc.numel(), 2))
        vbytes += vb
        kel += kc.numel()
    with torch.inference_mode():
        out = model(input_ids=cont_ids[:, :-1], past_key_values=new, use_cache=True)
    info = {"ratio": fp16 / held, "key_bits": 8 * kbytes / kel, "value_bits": 8 * vbytes / kel}
    return out.logits[0].float(), {**info, "layer_key_bits": layer_bits}


def nll(first_logits, logits, targets):
    all_logits = torch.cat([first_logits[None], logits], 0)
    return float(torch.nn.functional.cross_entropy(all_logits, targets).item())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", nargs="+", default=["alice29", "lcet10", "decode.c"])
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument(
        "--offset", type=float, default=0.0, help="start of the prefix as a fraction of the text (0.5: the middle)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from nexusquant.eval.harness import load_texts

    model, tok = load(args.model)
    texts = load_texts(args.text, tok)
    rows = []
    for text in texts:
        start = int(args.offset * max(0, len(text.ids) - args.prefix - args.continuation))
        ids = torch.tensor([text.ids[start : start + args.prefix + args.continuation]])
        pre, cont = ids[:, : args.prefix], ids[:, args.prefix :]
        t0 = time.time()
        first, cache, queries = prefix_cache(model, pre)
        cos, sin = rope_angles(model, args.prefix)
        base_logits, _ = run_variant(model, cache, cont, "fp:fp", args.prefix, cos, sin)
        base = nll(first, base_logits, cont[0])
        for spec in args.variants:
            logits, info = run_variant(model, cache, cont, spec, args.prefix, cos, sin, queries)
            d = 100 * (math.exp(nll(first, logits, cont[0]) - base) - 1)
            # KL(uncompressed || coded) per continuation token: far less noisy than a PPL delta.
            kl = float(
                torch.nn.functional.kl_div(
                    logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="batchmean"
                )
            )
            row = {"text": text.name, "prefix": args.prefix, "variant": spec, "ppl_delta_pct": d, "kl": kl, **info}
            rows.append(row)
            print(
                f"{text.name:10s} {spec:24s} ratio {info['ratio']:6.2f} key bits {info['key_bits']:5.2f} "
                f"value bits {info['value_bits']:5.2f}  "
                f"dPPL {d:+7.2f}%  KL {kl:.4f}",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr)
    print("\nmeans over texts")
    for spec in args.variants:
        sel = [r for r in rows if r["variant"] == spec]
        print(
            f"{spec:24s} ratio {sum(r['ratio'] for r in sel) / len(sel):6.2f} key bits "
            f"{sum(r['key_bits'] for r in sel) / len(sel):5.2f}  "
            f"dPPL {sum(r['ppl_delta_pct'] for r in sel) / len(sel):+7.2f}%  "
            f"KL {sum(r['kl'] for r in sel) / len(sel):.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
