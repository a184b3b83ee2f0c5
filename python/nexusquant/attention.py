"""The attention function that runs over a nexusquant cache, registered as ``"nexusquant"``.

transformers calls it in place of SDPA (``config._attn_implementation == "nexusquant"``). When the
keys come from a :class:`~nexusquant.cache.NexusQuantLayer` (they carry a ``LayerView``), it

1. masks the compressed slots itself (validity of ragged rows, sliding windows by sequence index)
   and takes the model's own mask for the full-precision window;
2. after a prompt-like forward (more than one query), scores the window's tokens with the real
   queries it was given and tells the layer to compress them; during generation it compresses
   full blocks of the window.

Anything else (no cache, a plain cache) goes to transformers' SDPA, or to the model's own eager
attention where the model soft-caps logits, so the model computes exactly what it always did.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import gpu
from ._core import NexusQuantError
from .cache import ATTN_IMPLEMENTATION, LayerView, NexusQuantLayer, _split_half_rotation
from .chunking import held_for_next_chunk
from .scoring import SCORERS, ScoreInputs, query_importance
from .tables import dense_rotation_torch
from .tiers import TransformCodedKeys

__all__ = ["nexusquant_attention", "register"]

_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias")


def _reference_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs):
    """What the model would compute without nexusquant: SDPA, or its own eager path for softcap."""
    if softcap is not None:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NexusQuantError(
                f"{type(module).__name__} soft-caps attention logits but has no eager_attention_forward"
            )
        # Our mask interface makes SDPA-style boolean masks (or None for plain causal); the eager
        # path adds its mask to the logits, so it needs the additive form.
        allowed = _as_bool(attention_mask)
        if allowed is None:
            allowed = _causal(query.shape[2], key.shape[2], key.device)
            sliding = kwargs.get("sliding_window")
            if sliding is not None:
                q, kv = query.shape[2], key.shape[2]
                qi = torch.arange(q, device=key.device)[:, None] + (kv - q)
                allowed = allowed & (torch.arange(kv, device=key.device)[None, :] > qi - sliding)[None, None]
        additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        additive.masked_fill_(~allowed, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, additive, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _as_bool(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 where allowed


def _causal(q: int, kv: int, device: torch.device) -> torch.Tensor:
    """bool ``(1, 1, q, kv)``: the last ``q`` of ``kv`` tokens are the queries."""
    qi = torch.arange(q, device=device)[:, None] + (kv - q)
    return (torch.arange(kv, device=device)[None, :] <= qi)[None, None]


def _window_mask(
    view: LayerView, model_mask: Optional[torch.Tensor], q: int, sliding: Optional[int], device
) -> torch.Tensor:
    """bool ``(B or 1, 1, q, W)`` for the window, ending with this forward's ``q`` tokens."""
    layer = view.layer
    w = view.window
    if model_mask is not None:
        m = model_mask[..., -w:]
    else:
        m = _causal(q, w, device)
        if sliding is not None:
            qi = torch.arange(q, device=device)[:, None] + (w - q)
            m = m & (torch.arange(w, device=device)[None, :] > qi - sliding)[None, None]
    assert layer.win_valid is not None
    return m & layer.win_valid[:, None, None, -w:]


def _compressed_mask(view: LayerView, q: int, sliding: Optional[int], device) -> Optional[torch.Tensor]:
    """bool ``(B or 1, H or 1, q, C)`` for the compressed slots, or None if all are visible."""
    m = None
    if view.comp_valid is not None:
        m = view.comp_valid[:, :, None, :]
    if sliding is not None and view.comp_seq is not None:
        q_seq = view.seen_before + torch.arange(q, device=device)
        vis = view.comp_seq[:, :, None, :].to(torch.int64) > (q_seq - sliding)[None, None, :, None]
        m = vis if m is None else m & vis
    return m


# Most booleans a many-query attention's mask may hold at once (256 MB; SDPA makes a float copy).
_MASK_ELEMENTS = 1 << 28


def _attention_per_query_head(query, key, value, attn_mask, scaling, dropout):
    """SDPA of ``query`` ``(B, H_q, q, D)`` over ``key``/``value`` ``(B, H_kv, T, D)``, one call per
    query head of a KV group, every call with the same ``attn_mask`` (a ``(B, H_kv, q, T)`` mask or
    a causal bias): keys, values and the mask are never repeated for the group. Returns
    ``(B, H_kv, g, q, D)``."""
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    qg = query.reshape(b, hkv, g, q, d)
    return torch.stack(
        [
            F.scaled_dot_product_attention(
                qg[:, :, j], key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scaling
            )
            for j in range(g)
        ],
        dim=2,
    )


def _masked_attention(query, key, value, allowed, scaling, softcap, dropout, first_own=None):
    """Attention with a per-KV-head bool mask ``allowed`` ``(B or 1, H_kv or 1, q, T)``.

    Queries are grouped by KV head, so keys and values are never repeated for GQA. ``first_own``:
    the key slot of the first query's own token (default ``T - q``: the queries are the last tokens).
    Returns ``(B, q, H_q, D)`` as transformers' attention functions do.
    """
    b, hq, q, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    g = hq // hkv
    qp = query.reshape(b, hkv, g * q, d)
    mask = allowed.expand(b, hkv, q, t)
    # A query that may see nothing (a padding position) would give NaN, which a later layer's
    # masked-out weight of 0 does not cancel (0 * NaN): let it see its own slot instead.
    empty = ~mask.any(dim=-1)
    if bool(empty.any()):
        mask = mask.clone()
        own = torch.arange(q, device=mask.device) + (t - q if first_own is None else first_own)
        mask[..., torch.arange(q, device=mask.device), own] |= empty
    if softcap is None and g * mask.numel() > _MASK_ELEMENTS:
        # One call per query head of a group, all sharing the (B, H_kv, q, T) mask: a mask repeated
        # for the group would be a copy g times its size (GBs for a chunk of a long prompt).
        out = _attention_per_query_head(query, key, value, mask, scaling, dropout)
    else:
        # Small masks (decode: one query per sequence) are repeated for the group and used in one
        # call, as this path always has (same kernel, same rounding as the measurements).
        mask = mask[:, :, None].expand(b, hkv, g, q, t).reshape(b, hkv, g * q, t)
        if softcap is None:
            out = F.scaled_dot_product_attention(qp, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        else:
            logits = torch.matmul(qp, key.transpose(-1, -2)) * scaling
            logits = torch.tanh(logits / softcap) * softcap
            logits = logits.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
            out = torch.matmul(probs, value)
    return out.reshape(b, hq, q, value.shape[-1]).transpose(1, 2).contiguous()


# Devices where a chunk with nothing masked but causality runs without a mask (see
# _is_plain_chunk). On the CPU SDPA would build the same mask itself, and the CPU measurements
# (docs/EVAL.md) keep the rounding of the masked call they were made with.
_MASK_FREE_DEVICES = ("cuda",)


def _is_plain_chunk(query: torch.Tensor, comp, win: torch.Tensor, softcap) -> bool:
    """Whether the forward's ``q`` queries are the last ``q`` of the layer's tokens and see
    everything before them and nothing after: every compressed slot valid (``comp`` None: no
    eviction, padding or sliding window), the window's mask the plain causal one, no soft-cap.
    That is a chunk of a chunked prefill of an unpadded prompt, the case that needs the memory:
    its mask over a long prefix is what the masked path holds (4.3 GB at 128K tokens and 8 KV
    heads; docs/GPU.md)."""
    if query.device.type not in _MASK_FREE_DEVICES or softcap is not None or comp is not None:
        return False
    q, w = query.shape[2], win.shape[-1]
    return bool(torch.equal(win, _causal(q, w, win.device).expand_as(win)))


def _lower_right_causal_attention(query, key, value, scaling, dropout):
    """Attention of ``query`` ``(B, H_q, q, D)``, the last ``q`` of ``key``'s ``T`` tokens, over
    every token up to its own: SDPA with torch's lower-right causal bias, which reaches the
    flash or memory-efficient kernel without a mask in memory (on a device without them torch
    builds the ``(q, T)`` mask). Keys and values are never repeated for GQA: where the flash
    kernel takes the grouped heads itself, one call for all query heads; elsewhere one call per
    query head of a KV group. Returns ``(B, q, H_q, D)``."""
    b, hq, q, _ = query.shape
    bias = causal_lower_right(q, key.shape[2])
    if _flash_takes_grouped_heads(query, key, value, dropout):
        # One call reads each KV head's keys and values once for its whole group; one call per
        # query head read them g times (4 for Llama-3-8B): 3.9 s of a 131,072-token chunked
        # prefill's 8.9 s was this attention (docs/GPU.md).
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous()
    out = _attention_per_query_head(query, key, value, bias, scaling, dropout)
    return out.reshape(b, hq, q, value.shape[-1]).transpose(1, 2).contiguous()


def _flash_takes_grouped_heads(query, key, value, dropout) -> bool:
    """Whether SDPA's flash kernel runs this grouped-query attention as it is (CUDA, its dtypes
    and head sizes, fewer KV heads than query heads): torch's other kernels would repeat the keys
    and values for the group, or build the mask."""
    if query.device.type != "cuda" or key.shape[1] == query.shape[1]:
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        return bool(can_use_flash_attention(SDPAParams(query, key, value, None, dropout, False, True)))
    except (ImportError, TypeError, RuntimeError):  # a torch without grouped heads in SDPA
        return False


def _new_token_validity(model_mask: Optional[torch.Tensor], q: int) -> Optional[torch.Tensor]:
    """bool ``(B, q)``: which of the forward's tokens are real (a padding token sees not even itself)."""
    if model_mask is None:
        return None
    m = model_mask[:, 0, :, -q:]  # (B, q, q)
    return torch.diagonal(m, dim1=-2, dim2=-1)


def _scores(
    layer: NexusQuantLayer, view: LayerView, module, query, key, value, allowed, scaling, softcap
) -> torch.Tensor:
    """Importance of the window's tokens ``(B, H_kv, W)`` from the configured scorer."""
    fn = SCORERS.get(layer.settings.scorer)
    if fn is None:
        raise NexusQuantError(f"unknown scorer {layer.settings.scorer!r}; registered: {sorted(SCORERS)}")
    assert layer.win_valid is not None
    inputs = ScoreInputs(query, key, value, allowed, view.window, layer.win_valid, scaling, softcap, layer, module)
    scores = fn(inputs)
    if scores.shape != (key.shape[0], key.shape[1], view.window):
        raise NexusQuantError(f"scorer {layer.settings.scorer!r} returned shape {tuple(scores.shape)}")
    return scores


def _sink_mask(view: LayerView, b: int, hkv: int, device: torch.device) -> torch.Tensor:
    """bool ``(B, H_kv, 1, S)``: which of the ``S = view.compressed`` full-precision sinks each
    batch row holds (all of them where no row is padded), for one decode query."""
    c = (
        view.comp_valid[:, :, None, :]
        if view.comp_valid is not None
        else torch.ones(1, 1, 1, view.compressed, dtype=torch.bool, device=device)
    )
    return c.expand(b, hkv, 1, view.compressed)


def _merge(parts):
    """Combine partial softmax states ``(m, l, acc)`` (max, sum of exp, weighted values) into outputs."""
    m_tot = torch.stack([m for m, _, _ in parts]).amax(0)
    num = 0.0
    den = 0.0
    for m, l, a in parts:
        w = torch.exp(m - m_tot).nan_to_num(0.0)
        num = num + w[..., None] * a
        den = den + w * l
    return num / den[..., None]


def _fused_decode(layer: NexusQuantLayer, view: LayerView, query, key, value, model_mask, scaling, sliding):
    """One query per sequence: attention over the codes of the lazy tiers merged with the
    full-precision sinks and window. On CUDA one kernel launch does all of it
    (``gpu.decode_attention``); elsewhere the torch reference below. Returns ``(B, 1, H_q, D)``."""
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    if any(isinstance(t.keys, TransformCodedKeys) for t in view.lazy_tiers):
        return _decode_rebuilt(layer, view, query, key, value, model_mask, scaling)
    if query.device.type == "cuda" and sliding is None:
        fp_mask = None
        if model_mask is not None or view.comp_valid is not None:
            # Padded rows: the model's mask over the window and the sinks' validity, as one mask.
            win = _window_mask(view, model_mask, q, sliding, key.device)
            masks = [_sink_mask(view, b, hkv, key.device)] if view.compressed else []
            masks.append(win.expand(b, hkv, 1, view.window))
            fp_mask = torch.cat(masks, dim=-1).reshape(b, hkv, -1).contiguous()
        tiers = [
            gpu.CodedTier(
                t.keys.codes, t.keys.scales, t.values.codes, t.values.scales, t.valid, t.keys.codec, t.values.codec
            )
            for t in view.lazy_tiers
        ]
        return gpu.decode_attention(
            query, key, value, view.compressed, fp_mask, layer.win_valid, tiers, layer.k_center, layer.v_center, scaling
        )
    g = hq // hkv
    qg = query.reshape(b, hkv, g, d).float()
    # Full-precision part: sinks and window, with their masks.
    win = _window_mask(view, model_mask, q, sliding, key.device)
    comp = _compressed_mask(view, q, sliding, key.device)
    masks = []
    if view.compressed:
        c = comp if comp is not None else torch.ones(1, 1, 1, view.compressed, dtype=torch.bool, device=key.device)
        masks.append(c.expand(b, hkv, 1, view.compressed))
    masks.append(win.expand(b, hkv, 1, view.window))
    allowed = torch.cat(masks, dim=-1)  # (B, Hkv, 1, T_fp)
    s = torch.matmul(qg, key.float().transpose(-1, -2)) * scaling  # (B, Hkv, g, Tfp)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m[..., None]).nan_to_num(0.0)
    parts = [(m, p.sum(-1), torch.matmul(p, value.float()))]
    for tier in view.lazy_tiers:
        kc, vc = tier.keys.codec, tier.values.codec
        rot, inv_rot = dense_rotation_torch(kc.head_dim, 2, kc.seed, str(query.device))
        q_rot = torch.matmul(qg, rot) * scaling
        if layer.k_center is not None:
            q_center = (qg * layer.k_center.float()).sum(-1) * scaling  # (B, Hkv, g)
        else:
            q_center = torch.zeros(b, hkv, g, device=query.device)
        pp = q_rot.shape[-1]
        n = tier.keys.scales.shape[2]
        valid = None if tier.valid is None else tier.valid.reshape(b * hkv, n)
        pm, pl, pa = gpu.decode_attention_partials_reference(
            kc,
            vc,
            q_rot.reshape(b * hkv, g, pp).contiguous(),
            q_center.reshape(b * hkv, g).contiguous(),
            tier.keys.codes.reshape(b * hkv, n, -1),
            tier.keys.scales.reshape(b * hkv, n),
            tier.values.codes.reshape(b * hkv, n, -1),
            tier.values.scales.reshape(b * hkv, n),
            valid,
        )
        mm, ll, aa = _merge_splits(pm, pl, pa)  # (BH, g), (BH, g), (BH, g, P)
        a = torch.matmul(aa, inv_rot)  # back to the head dimension
        if layer.v_center is not None:
            a = a + ll[..., None] * layer.v_center.float().reshape(b * hkv, 1, d)
        parts.append((mm.reshape(b, hkv, g), ll.reshape(b, hkv, g), a.reshape(b, hkv, g, d)))
    out = _merge(parts)  # (B, Hkv, g, D)
    return out.to(query.dtype).reshape(b, hq, 1, d).transpose(1, 2).contiguous()


def _decode_rebuilt(layer: NexusQuantLayer, view: LayerView, query, key, value, model_mask, scaling):
    """One query per sequence over a layer with transform-coded keys, on CUDA: each tier rebuilt
    in float32 (:meth:`NexusQuantLayer.decode_tier`) and attended on its own, the partial softmax
    states merged with the full-precision sinks and window's; the masks are the ones
    :meth:`NexusQuantLayer.materialize` would give SDPA (tier validity, sinks' validity, the
    model's mask over the window). No concatenation of the layer's keys with the window and no
    SDPA call, whose cuDNN kernel plans itself anew for every length (~8 ms per layer and step
    at 32K tokens on an H200). Returns ``(B, 1, H_q, D)``."""
    if query.device.type == "cuda" and _fused_is_faster(view):
        out = _decode_pca_fused(layer, view, query, key, value, model_mask, scaling)
        if out is not None:
            return out
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    qg = query.reshape(b, hkv, g, d).float() * scaling
    win = _window_mask(view, model_mask, q, None, key.device)
    masks = [_sink_mask(view, b, hkv, key.device)] if view.compressed else []
    masks.append(win.expand(b, hkv, 1, view.window))
    allowed = torch.cat(masks, dim=-1)  # (B, Hkv, 1, T_fp)
    s = torch.matmul(qg, key.float().transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m[..., None]).nan_to_num(0.0)
    parts = [(m, p.sum(-1), torch.matmul(p, value.float()))]
    for tier in view.lazy_tiers:
        k, v = _rebuilt_tier(layer, tier, d, query.device)  # float32 (B, Hkv, T, D)
        s = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, g, T)
        if tier.valid is not None:
            s = s.masked_fill(~tier.valid[:, :, None, :], float("-inf"))
        m = s.amax(-1)
        p = torch.exp(s - m[..., None]).nan_to_num(0.0)
        parts.append((m, p.sum(-1), torch.matmul(p, v)))
    out = _merge(parts)  # (B, Hkv, g, D)
    return out.to(query.dtype).reshape(b, hq, 1, d).transpose(1, 2).contiguous()


# Per layer (by id): the int32 sequence indices of the transform-coded tier, with the tier's tensor
# and its version (the tier changes only when blocks are compressed into it). An entry goes when its
# layer does (weakref.finalize), so a long-running process that makes many caches keeps none of them.
_SEQ32: dict[int, tuple] = {}

# The fused kernel (_decode_pca_fused) is taken for a transform-coded tier of at most this many
# tokens per batch row, the rebuild path above it. Measured on an H200 (8B shape, 3 b/elem, batch 1,
# `python benches/pca_keys_bench.py --rate 3 --tokens 131072 --sweep ...`,
# benches/results/pca_keys_bench_stage_128k.*): the staged kernel (pre-pass included) against the
# whole rebuild path (rebuild + place + E8 values + float32 attention) 0.11 vs 0.40 ms at 1K tokens,
# 0.53 vs 1.86 at 32K, 1.85 vs 6.85 at 128K: no crossover, the fused kernel everywhere.
# NEXUSQUANT_PCA_FUSED_MAX_TOKENS sets a bound (benchmarks; a GPU where the crossover exists).
_FUSED_MAX_TOKENS = int(os.environ.get("NEXUSQUANT_PCA_FUSED_MAX_TOKENS", str(1 << 62)))


def _fused_is_faster(view: LayerView) -> bool:
    for t in view.lazy_tiers:
        if isinstance(t.keys, TransformCodedKeys) and t.values.scales.shape[2] > _FUSED_MAX_TOKENS:
            return False
    return True


def _seq32(layer: NexusQuantLayer, tier) -> torch.Tensor:
    """int32 ``(B, T)``: the tier's sequence indices (every head holds the same tokens), cached."""
    hit = _SEQ32.get(id(layer))
    if hit is None:
        weakref.finalize(layer, _SEQ32.pop, id(layer), None)
    held = tier.positions_held  # ``tier.seq`` may be a new broadcast view at every call
    if hit is None or hit[0] is not held or hit[1] != held._version:
        hit = _SEQ32[id(layer)] = (held, held._version, held[:, 0].to(torch.int32).contiguous())
    return hit[2]


def _rebuilt_tier(layer: NexusQuantLayer, tier, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`NexusQuantLayer.decode_tier`, except for a pre-RoPE transform-coded tier whose rotary
    table holds positions: its keys are rotated by ``nq_pca_place`` with the angles computed in the
    kernel from each token's position (as the fused kernel does), so no rows of the table are made
    at every step (``table.mirror``: every position's angles in torch)."""
    keys = tier.keys
    pre_rope = layer.settings.key_domain == "pre_rope" and keys.bits != 16
    if not (pre_rope and isinstance(keys, TransformCodedKeys) and tier.seq is not None):
        return layer.decode_tier(tier)
    rope = _pca_rope(layer, d, device)
    if rope is None or rope[0] != "positions":
        return layer.decode_tier(tier)
    _, pos, inv_freq, rscale, rdtype = rope
    v = tier.values.dequantize().float()
    if layer.v_center is not None:
        v = v + layer.v_center.float()
    keys.join_appends()
    b, h, t, _ = v.shape
    out = torch.empty(b, h, t, d, dtype=torch.float32, device=v.device)
    center = None if layer.k_center is None else layer.k_center.reshape(b, h * d)
    seq = _seq32(layer, tier)
    exact = layer.dtype == torch.float32
    for i, row in enumerate(keys.rows):
        flat = gpu.transform_keys(row[0], None if center is None else center[i], exact)  # (T, H * D)
        r = min(i, pos.shape[0] - 1)  # a table of one row serves every batch row
        gpu.place_keys(flat, h, out[i], seq=seq[i], positions=(pos[r], inv_freq, rscale, rdtype))
    return out, v


def _pca_rope(layer: NexusQuantLayer, d: int, device) -> Optional[tuple]:
    """The rotary table as the fused kernel reads it: ``("positions", positions, inv_freq,
    scaling, dtype)`` for a table of positions, ``("rows", cos, sin)`` float32 otherwise; None
    where the model's rotation is not the full-width split-half one the kernel computes."""
    if layer.rope_adapter is None or layer.rope_key not in layer.rope_tables:
        return None
    table = layer.rope_tables[layer.rope_key]
    if table.formula is not None:
        inv = table.formula.inv_freq
        if 2 * inv.numel() != d or not _split_half_rotation(layer.rope_adapter, d, d // 2, True):
            return None
        (pos,) = table._held_on(device)
        inv = inv.to(device=device, dtype=torch.float32).contiguous()  # no copy: already there
        return ("positions", pos.to(torch.int32).contiguous(), inv, float(table.formula.scaling), table.formula.dtype)
    rope = layer._kernel_rope()
    if rope is None or rope[2] != d:
        return None
    return ("rows", rope[0], rope[1])


def _decode_pca_fused(layer: NexusQuantLayer, view: LayerView, query, key, value, model_mask, scaling):
    """One query per sequence over a layer with one transform-coded tier, in one kernel launch
    (:func:`nexusquant.gpu.pca_decode_attention`): the tier's keys are rebuilt, rotated and scored
    on chip, its E8 values decoded in the same pass; any other tier (the E8 "generated" one) is
    dequantized as :meth:`NexusQuantLayer.decode_tier` does and joins the sinks and the window as
    full-precision tokens. None where the kernel does not apply (the caller rebuilds)."""
    if gpu.PCA_FUSED_DISABLED:
        return None
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    pca = [t for t in view.lazy_tiers if isinstance(t.keys, TransformCodedKeys)]
    others = [t for t in view.lazy_tiers if not isinstance(t.keys, TransformCodedKeys)]
    if len(pca) != 1 or hq // hkv > 8:
        return None
    tier = pca[0]
    if tier.values.ref_idx is not None:
        return None  # the kernel reads one E8 code per value: refined values take the rebuild path
    pre_rope = layer.settings.key_domain == "pre_rope"
    rope = seq = None
    if pre_rope:
        rope = _pca_rope(layer, d, query.device)
        if rope is None or tier.seq is None:
            return None
        seq = _seq32(layer, tier)
    tier.keys.join_appends()
    codes = [row[0] for row in tier.keys.rows]
    center = None if layer.k_center is None else layer.k_center.reshape(b, hkv * d)
    # Full-precision part: sinks, then the other tiers' tokens (dequantized, RoPE redone), then the window.
    win = _window_mask(view, model_mask, q, None, key.device)
    n_sink = view.compressed
    fp_mask = None
    if others or model_mask is not None or view.comp_valid is not None:
        masks = []
        keys, values = [], []
        if n_sink:
            masks.append(_sink_mask(view, b, hkv, key.device))
            keys.append(key[:, :, :n_sink])
            values.append(value[:, :, :n_sink])
        for t in others:
            k, v = layer.decode_tier(t)
            keys.append(k.to(key.dtype))
            values.append(v.to(value.dtype))
            n = k.shape[2]
            tv = (
                t.valid[:, :, None, :]
                if t.valid is not None
                else torch.ones(1, 1, 1, n, dtype=torch.bool, device=key.device)
            )
            masks.append(tv.expand(b, hkv, 1, n))
        masks.append(win.expand(b, hkv, 1, view.window))
        keys.append(key[:, :, n_sink:])
        values.append(value[:, :, n_sink:])
        fp_mask = torch.cat(masks, dim=-1).reshape(b, hkv, -1).contiguous()
        if others:
            key, value = torch.cat(keys, dim=2), torch.cat(values, dim=2)
            n_sink = key.shape[2] - view.window
    assert layer.win_valid is not None
    return gpu.pca_decode_attention(
        query,
        key,
        value,
        n_sink,
        fp_mask,
        layer.win_valid,
        codes,
        center,
        tier.values,
        tier.valid,
        seq,
        rope,
        layer.v_center,
        scaling,
    )


def _merge_splits(m, l, acc):
    """Merge the splits ``(BH, S, g)`` of partial states."""
    mm = m.amax(1)
    w = torch.exp(m - mm[:, None]).nan_to_num(0.0)
    return mm, (w * l).sum(1), (w[..., None] * acc).sum(1)


def nexusquant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
):
    """transformers attention interface: ``query`` ``(B, H_q, q, D)``, ``key``/``value``
    ``(B, H_kv, T, D)``; returns ``((B, q, H_q, D), None)``."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NexusQuantError(
                f"{type(module).__name__} passes {name!r} to attention, which nexusquant does not support"
            )
    softcap = kwargs.pop("softcap", None)
    sliding = kwargs.get("sliding_window")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    view: Optional[LayerView] = getattr(key, "_nq_view", None)
    if view is None:
        return _reference_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
    view.consumed = True
    layer = view.layer
    q = query.shape[2]
    model_mask = _as_bool(attention_mask)
    new_valid = _new_token_validity(model_mask, q)
    if new_valid is not None:
        layer.mark_new_padding(new_valid)

    if view.lazy_tiers:
        if q == 1 and softcap is None and query.shape[1] // key.shape[1] <= 8:
            out = _fused_decode(layer, view, query, key, value, model_mask, scaling, sliding)
            if layer.wants_block_compression():
                layer.compress(None, generated=True)
            return out, None
        key, value = layer.materialize(view)
    s = layer.settings
    rows = min(s.score_window, q)  # the scorer only looks at the last queries' mask rows
    if view.compressed == 0:
        out, _ = _reference_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
        if model_mask is not None:
            assert layer.win_valid is not None
            allowed_rows = model_mask[..., -rows:, :] & layer.win_valid[:, None, None, :]
        else:
            allowed_rows = _causal(rows, key.shape[2], key.device)
    else:
        win = _window_mask(view, model_mask, q, sliding, key.device)
        comp = _compressed_mask(view, q, sliding, key.device)
        b = max(win.shape[0], 1 if comp is None else comp.shape[0])
        hc = 1 if comp is None else comp.shape[1]

        def allowed_for(start: int, end: int) -> torch.Tensor:
            """The bool mask of query rows ``start:end`` over the compressed part and the window."""
            n = end - start
            if comp is None:
                c = torch.ones(b, hc, n, view.compressed, dtype=torch.bool, device=key.device)
            else:
                c = (comp[:, :, start:end] if comp.shape[2] == q else comp).expand(b, hc, n, view.compressed)
            w = (win[:, :, start:end] if win.shape[2] == q else win).expand(b, hc, n, view.window)
            return torch.cat([c, w], dim=-1)

        t_all = key.shape[2]
        if _is_plain_chunk(query, comp, win, softcap):
            out = _lower_right_causal_attention(query, key, value, scaling, dropout)
        else:
            # Many queries over a long compressed prefix with a mask of their own (padding, evicted
            # slots, a sliding window): the mask is built and used a block of query rows at a time,
            # so it never takes more than _MASK_ELEMENTS booleans (a chunk of 2048 over 1M tokens and
            # 8 KV heads would need 17 GB).
            step = max(1, _MASK_ELEMENTS // max(1, b * hc * t_all))
            outs = []
            for start in range(0, q, step):
                end = min(q, start + step)
                outs.append(
                    _masked_attention(
                        query[:, :, start:end],
                        key,
                        value,
                        allowed_for(start, end),
                        scaling,
                        softcap,
                        dropout,
                        t_all - q + start,
                    )
                )
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        allowed_rows = allowed_for(q - rows, q)

    if q > 1 and layer.wants_prompt_compression():
        layer.observe_queries(query)
        hold = held_for_next_chunk()
        # The transform coder's fit may weigh tokens by the attention the last queries pay them,
        # and the most read tokens' values may be refined: attention not pooled, since a neighbour
        # of a read token is not read (pooled weights lost half the gain, docs/EVAL.md).
        attention = (
            query_importance(query[:, :, -rows:], key, allowed_rows, scaling, softcap).detach()
            if layer.wants_attention()
            else None
        )
        if layer.is_sliding or (s.evict == 0.0 and s.demote == 0.0):
            layer.compress(None, hold, attention=attention)
        else:
            layer.compress(
                _scores(layer, view, module, query, key, value, allowed_rows, scaling, softcap),
                hold,
                attention=attention,
            )
    elif layer.wants_block_compression():
        layer.compress(None, generated=True)
    return out, None


def register() -> None:
    """Make ``"nexusquant"`` a valid ``attn_implementation`` (global registry entry, no patching).

    Idempotent. Importing this module does not call it: :func:`nexusquant.register_attention` does
    (``import nexusquant`` arranges that, see there), and so does ``nexusquant_evict``.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, nexusquant_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
