"""Decode attention in plain torch: the reference the kernel is tested against, and the partial
softmax state used on CPU tensors when the fused path is asked for there."""

from __future__ import annotations

from ..tables import torch_decode_rotated
from .build import _device_index
from .codec import decode
from .device_tables import _dense_rotation

__all__ = ["rotate_queries", "decode_attention_partials_reference", "decode_attention_reference"]


def rotate_queries(codec, q):
    """``R q`` for queries ``(..., head_dim)`` in float32: the rotation the keys' codes live in."""
    import torch

    index = _device_index(q.device)
    rot = _dense_rotation(codec.head_dim, codec.bits, codec.seed, index)
    return torch.matmul(q.float(), rot)


def decode_attention_partials_reference(codec_k, codec_v, q_rot, q_center, kcodes, kscales, vcodes, vscales, valid):
    """Partial softmax state of one query per sequence over compressed tokens, in plain torch: the
    path used on CPU tensors when ``NEXUSQUANT_FUSED_REFERENCE_ON_CPU=1`` is set (see
    :meth:`nexusquant.cache.NexusQuantLayer.fused_decode_possible`).

    ``q_rot`` float32 ``(BH, g, P)`` (rotated queries times the scale), ``q_center`` ``(BH, g)``,
    codes ``(BH, T, code_bytes)``, scales ``(BH, T)``, valid ``(BH, T)`` or None. Returns
    ``(m, l, acc)`` of shapes ``(BH, 1, g)``, ``(BH, 1, g)``, ``(BH, 1, g, P)`` (rotated domain).
    """
    import torch

    yk = torch_decode_rotated(codec_k, kcodes, kscales)  # (BH, T, P)
    yv = torch_decode_rotated(codec_v, vcodes, vscales)
    s = torch.matmul(q_rot, yk.transpose(-1, -2)) + q_center[..., None]  # (BH, g, T)
    if valid is not None:
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m[..., None]).nan_to_num(0.0)
    return m[:, None], p.sum(-1)[:, None], torch.matmul(p, yv)[:, None]


def decode_attention_reference(query, key, value, fp_allowed, tiers, k_center, v_center, scaling):
    """:func:`~nexusquant.gpu.attention.decode_attention` in float64 torch over the dequantized codes
    (for tests).

    ``fp_allowed`` bool ``(B, H_kv, T_fp)``; ``tiers`` :class:`~nexusquant.gpu.attention.CodedTier`;
    other arguments as for ``decode_attention``. Returns float64 ``(B, 1, H_q, D)``.
    """
    import torch

    b, hq, _, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    ks, vs, allowed = [key.double()], [value.double()], [fp_allowed]
    for tier in tiers:
        k = decode(tier.key_codec, tier.key_codes, tier.key_scales, torch.float32).double()
        v = decode(tier.value_codec, tier.value_codes, tier.value_scales, torch.float32).double()
        if k_center is not None:
            k = k + k_center.double()
            v = v + v_center.double()
        ks.append(k)
        vs.append(v)
        valid = tier.valid
        allowed.append(valid if valid is not None else torch.ones(k.shape[:3], dtype=torch.bool, device=k.device))
    k = torch.cat(ks, 2)
    v = torch.cat(vs, 2)
    a = torch.cat(allowed, 2)  # (B, Hkv, T)
    q = query.double().reshape(b, hkv, g, d)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, Hkv, g, T)
    s = s.masked_fill(~a[:, :, None, :], float("-inf"))
    w = torch.softmax(s, -1)
    o = torch.matmul(w, v)  # (B, Hkv, g, D)
    return o.reshape(b, 1, hq, d)
