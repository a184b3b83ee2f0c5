"""Decode attention on the GPU: one new query per sequence over a layer's coded tiers and its
full-precision sinks and window, in one kernel launch (``nq_attend_*`` in ``cuda/nexusquant.cu``).

The kernel is launched through the driver (``cuLaunchKernel``) with its ~40 parameters in one
struct passed by value: CuPy's launcher takes one Python object per parameter, and at batch 1 that
per-call host time is a large part of a decode step (measured: docs/GPU.md). The struct,
``NqAttnParams``, is packed with one precompiled ``struct.pack_into`` per call: setting ctypes fields
one by one cost ~45 us of host time per call, more than the kernel itself at 8K tokens.

Its layout is written once, as :data:`ATTN_PARAM_FIELDS` (the C field names and their struct
codes); the pack format is built from it. tests/test_gpu_layout.py checks that list against the C
struct (names, order, sizes, the kernel's static_assert) and the one ``pack_into`` call below
against the list: the call passes each field as a local named after it (``<field>_ptr`` for a
pointer), so a reordered or added field on either side fails a CPU test, not a GPU run.
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from .._core import NexusQuantError
from ..codec import E8Codec
from .build import _FAST_DIMS, _SUFFIX, _function
from .device_tables import _half_table, _rotation, _single_block_scale
from .launch import _cu_launch, _OnDevice, _sm_count, _stream_ptr

if TYPE_CHECKING:
    import torch

__all__ = ["CodedTier", "decode_attention", "fused_supported"]


class CodedTier(NamedTuple):
    """One tier of coded tokens as decode attention reads it. A NamedTuple: built once per tier
    and decode step, and a field read by name costs what an index does."""

    key_codes: torch.Tensor  # uint8 (B, H_kv, T, code_bytes), 16-byte aligned
    key_scales: torch.Tensor  # int16 (B, H_kv, T): fp16 bit patterns
    value_codes: torch.Tensor
    value_scales: torch.Tensor
    valid: Optional[torch.Tensor]  # bool (B, H_kv, T), or None: every token
    key_codec: E8Codec
    value_codec: E8Codec


# NqTier, field by field: (C name, struct code). "Q": a pointer (8 bytes), "q": long long, "f": float.
TIER_FIELDS: tuple[tuple[str, str], ...] = (
    ("kcodes", "Q"),
    ("kscales", "Q"),
    ("vcodes", "Q"),
    ("vscales", "Q"),
    ("valid", "Q"),
    ("tokens", "q"),
    ("splits", "q"),
    ("chunk", "q"),
    ("kres", "f"),
    ("vres", "f"),
)
MAX_TIERS = 2  # NqTier tier[2]
# NqAttnParams, field by field, its last member NqTier tier[2] spelt out by C's own access paths
# ("tier[0].kcodes", ...). The one description of the layout: the pack format comes from it.
ATTN_PARAM_FIELDS: tuple[tuple[str, str], ...] = (
    ("q", "Q"),
    ("out", "Q"),
    ("kfp", "Q"),
    ("vfp", "Q"),
    ("fp_mask", "Q"),
    ("win_valid", "Q"),
    ("kcent", "Q"),
    ("vcent", "Q"),
    ("signs", "Q"),
    ("table", "Q"),
    ("part", "Q"),
    ("counters", "Q"),
    ("tfp", "q"),
    ("n_sink", "q"),
    ("win_total", "q"),
    ("g", "q"),
    ("hkv", "q"),
    ("bscale", "f"),
    ("qscale", "f"),
) + tuple((f"tier[{i}].{name}", code) for i in range(MAX_TIERS) for name, code in TIER_FIELDS)
# "<": no padding; every field of the list already sits at its C offset (the test checks it).
_ATTN_PARAMS = struct.Struct("<" + "".join(code for _, code in ATTN_PARAM_FIELDS))
assert _ATTN_PARAMS.size == 288  # static_assert(sizeof(NqAttnParams) == 288) in the kernel
_ATT_DTYPE = {"f32": 0, "f16": 1, "bf16": 2}  # NQ_ATT_T
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 256  # NQ_AMAXS: partial states per (batch, KV head), the merge's shared buffer
_MIN_CHUNK = 256  # tokens per block at least: below that a block's fixed costs dominate
_BLOCKS_PER_SM = 4  # resident blocks of the attention kernel (registers: ~128 per thread)
# Warps per block of the attention module (a compile-time define, NQ_AW); the launch must match.
_ATT_WARPS = 4
_tls = threading.local()
_workspaces: dict[tuple, Any] = {}
_plans: dict[tuple, tuple] = {}
_split_plans: dict[tuple, tuple] = {}
_ONE_GPU: list = []
_NO_TIER = CodedTier._make((None,) * 7)  # the absent second tier in a plan's key


def fused_supported(padded_dim: int, group: int) -> bool:
    """Shapes the decode-attention kernel handles: 64, 128 or 256 rotated dims, ≤ 8 query heads per KV head."""
    return padded_dim in _FAST_DIMS and group <= 8


def _param_buffer():
    """This thread's parameter block and the kernelParams array pointing at it."""
    st = getattr(_tls, "params", None)
    if st is None:
        buf = ctypes.create_string_buffer(_ATTN_PARAMS.size)
        kp = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        st = _tls.params = (buf, kp)
    return st


def _workspace(index: int, stream: int, bh: int, floats: int):
    """Partial-state buffer and zeroed completion counters, reused per (device, stream): kernels on
    one stream run in order, and each launch leaves its counters at zero."""
    import torch

    key = (index, stream)
    ws = _workspaces.get(key)
    if ws is None or ws[2] < floats or ws[3] < bh:
        dev = torch.device("cuda", index)
        part = torch.empty(max(floats, 1 << 20), dtype=torch.float32, device=dev)
        counters = torch.zeros(max(bh, 1024), dtype=torch.int32, device=dev)
        ws = _workspaces[key] = (part, counters, part.numel(), counters.numel(), part.data_ptr(), counters.data_ptr())
    return ws


def _splits(tokens: tuple, bh: int, index: int, p: int) -> tuple:
    """(tokens per block, blocks per tier): at most as many blocks as fit on the device at once
    (one wave; a block more on some SMs would make them run a second, latency-bound wave)."""
    key = (tokens, bh, index, p)
    hit = _split_plans.get(key)
    if hit is not None:
        return hit
    total = sum(tokens)
    per_sm = _BLOCKS_PER_SM if p <= 128 else max(1, _BLOCKS_PER_SM // 2)  # P = 256 needs ~220 registers
    per_bh = max(1, (per_sm * _sm_count(index) * 4 // _ATT_WARPS) // bh)
    chunk = max(_MIN_CHUNK, math.ceil(total / per_bh))
    tile = 16 * _ATT_WARPS
    chunk = math.ceil(chunk / tile) * tile
    while True:
        counts = tuple(math.ceil(t / chunk) for t in tokens)
        if sum(counts) + 1 <= _MAX_SPLITS:
            break
        chunk *= 2
    plan = _split_plans[key] = (chunk, counts, sum(counts) + 1)
    return plan


def _plan(index: int, dtype, tiers) -> tuple:
    """(CUfunction, signs pointer, table pointer, 1/sqrt(P), P, residual ratios) for a dtype and the
    tiers' codecs. Keyed by the codec objects themselves (tables.get_codec shares them), which is
    cheaper than reading their attributes on every decode step."""
    t0 = tiers[0]
    t1 = tiers[1] if len(tiers) > 1 else _NO_TIER
    key = (index, dtype, t0.key_codec, t0.value_codec, t1.key_codec, t1.value_codec, len(tiers))
    hit = _plans.get(key)
    if hit is not None:
        return hit
    kc0 = t0.key_codec
    p = kc0.padded_dim
    suffix = _SUFFIX.get(str(dtype))
    if suffix is None:
        raise NexusQuantError(f"decode attention: unsupported dtype {dtype}")
    if len(tiers) > 2 or p != kc0.head_dim or p not in _FAST_DIMS:
        raise NexusQuantError(f"decode attention: unsupported shape (head_dim {kc0.head_dim}, {len(tiers)} tiers)")
    if any(
        t.key_codec.head_dim != kc0.head_dim or t.key_codec.seed != kc0.seed or t.value_codec.seed != kc0.seed
        for t in tiers
    ):
        raise NexusQuantError("decode attention: all tiers must share one rotation (head_dim and seed)")
    bits = [b for t in tiers for b in (t.key_codec.bits, t.value_codec.bits)] + [0, 0]
    defines: tuple[tuple[str, int], ...] = (
        ("NQ_ATT_P", p),
        ("NQ_ATT_KB0", bits[0]),
        ("NQ_ATT_VB0", bits[1]),
        ("NQ_ATT_KB1", bits[2]),
        ("NQ_ATT_VB1", bits[3]),
        ("NQ_ATT_T", _ATT_DTYPE[suffix]),
        ("NQ_AW", _ATT_WARPS),
    )
    if p <= 128:
        # Cap registers at 128 so that _BLOCKS_PER_SM blocks fit (uncapped the kernel takes 136
        # and only 3 fit: 8-20% slower at the bench shapes, docs/GPU.md).
        defines += (("NQ_ATT_MINB", _BLOCKS_PER_SM),)
    fn = _function(index, defines, False, f"nq_attend_{suffix}")
    signs = _rotation(kc0.head_dim, kc0.bits, kc0.seed, index)[0]
    res = tuple(float(c.residual_ratio or 1.0) for t in tiers for c in (t.key_codec, t.value_codec)) + (1.0, 1.0)
    plan = _plans[key] = (
        fn.ptr,
        signs.data_ptr(),
        _half_table(index).data_ptr(),
        float(_single_block_scale(p)),
        p,
        res,
    )
    return plan


def _tier_params(tier, *, tokens: int, splits: int, chunk: int, kres: float, vres: float) -> tuple:
    """One NqTier's fields in TIER_FIELDS order, each a local named after its field (the test reads
    the tuple returned at the end); ``tier`` None: the absent second tier (null pointers)."""
    if tier is None:
        kcodes_ptr = kscales_ptr = vcodes_ptr = vscales_ptr = valid_ptr = 0
    else:
        kcodes_ptr, vcodes_ptr = tier.key_codes.data_ptr(), tier.value_codes.data_ptr()
        if (kcodes_ptr | vcodes_ptr) & 15:
            raise NexusQuantError("decode attention: code arrays must be 16-byte aligned")
        kscales_ptr, vscales_ptr = tier.key_scales.data_ptr(), tier.value_scales.data_ptr()
        valid = tier.valid
        valid_ptr = valid.data_ptr() if valid is not None else 0
    return (kcodes_ptr, kscales_ptr, vcodes_ptr, vscales_ptr, valid_ptr, tokens, splits, chunk, kres, vres)


def decode_attention(
    query, key, value, n_sink: int, fp_mask, win_valid, tiers, k_center, v_center, scaling: float, out=None
):
    """Attention of one new query per sequence over a layer's compressed tiers and its
    full-precision sinks and window, in one kernel launch.

    Parameters
    ----------
    query : torch.Tensor
        ``(B, H_q, 1, D)`` in the model's dtype (float16, bfloat16 or float32).
    key, value : torch.Tensor
        ``(B, H_kv, T_fp, D)``: the ``n_sink`` sinks, then the window (ending with this token).
    fp_mask : torch.Tensor or None
        bool ``(B, H_kv, T_fp)``: which full-precision tokens may be seen; None means every sink and
        the window tokens that ``win_valid`` marks.
    win_valid : torch.Tensor
        bool ``(B, W)``: the window's validity; its last ``T_fp - n_sink`` entries are the window.
    tiers : sequence of CodedTier
        One or two :class:`CodedTier`: codes uint8 ``(B, H_kv, T, code_bytes)``, scales int16
        ``(B, H_kv, T)``, valid bool ``(B, H_kv, T)`` or None, and the keys' and values' codecs.
    k_center, v_center : torch.Tensor or None
        ``(B, H_kv, 1, D)``: added back to the tiers' keys and values (not to sinks and window).
    scaling : float
        The softmax scale.
    out : torch.Tensor, optional
        ``(B, 1, H_q, D)`` to write into.

    Returns
    -------
    torch.Tensor
        ``(B, 1, H_q, D)`` in the query's dtype.
    """
    import torch

    b, hq, _, d = query.shape
    hkv, tfp = key.shape[1], key.shape[2]
    g = hq // hkv
    bh = b * hkv
    dtype = query.dtype
    index = query.get_device()
    fn_ptr, signs_ptr, table_ptr, bscale, p, res = _plan(index, dtype, tiers)
    if p != d or g > 8:
        raise NexusQuantError(f"decode attention: unsupported shape (head_dim {d}, {g} query heads per KV head)")
    if key.dtype != dtype:
        key = key.to(dtype)
        value = value.to(dtype)
    query = query.contiguous()
    key = key.contiguous()
    value = value.contiguous()
    kcent_ptr = vcent_ptr = 0
    if k_center is not None:
        if k_center.dtype != dtype:
            k_center = k_center.to(dtype)
            v_center = v_center.to(dtype)
        k_center = k_center.contiguous()
        v_center = v_center.contiguous()
        kcent_ptr, vcent_ptr = k_center.data_ptr(), v_center.data_ptr()
    stream = _stream_ptr(index)
    t0 = tiers[0]
    t1 = tiers[1] if len(tiers) > 1 else None
    tokens: tuple[int, ...] = (
        (t0.key_scales.shape[2],) if t1 is None else (t0.key_scales.shape[2], t1.key_scales.shape[2])
    )
    chunk, counts, s_total = _splits(tokens, bh, index, p)
    ws = _workspace(index, stream, bh, bh * s_total * (16 + 8 * p))
    if out is None:
        out = torch.empty(b, 1, hq, d, dtype=dtype, device=query.device)
    q_ptr = query.data_ptr()
    out_ptr = out.data_ptr()
    kfp_ptr = key.data_ptr()
    vfp_ptr = value.data_ptr()
    fp_mask_ptr = fp_mask.data_ptr() if fp_mask is not None else 0
    win_valid_ptr = win_valid.data_ptr()
    win_total = win_valid.shape[1]
    part_ptr = ws[4]
    counters_ptr = ws[5]
    qscale = scaling * _LOG2E
    # By keyword: the parameters carry the NqTier field names.
    tier0 = _tier_params(t0, tokens=tokens[0], splits=counts[0], chunk=chunk, kres=res[0], vres=res[1])
    if t1 is None:
        tier1 = _tier_params(None, tokens=0, splits=0, chunk=chunk, kres=1.0, vres=1.0)
    else:
        tier1 = _tier_params(t1, tokens=tokens[1], splits=counts[1], chunk=chunk, kres=res[2], vres=res[3])
    buf, kp_arr = _param_buffer()
    # NqAttnParams, one argument per field of ATTN_PARAM_FIELDS in its order, each a local named
    # after its field: tests/test_gpu_layout.py reads this call and fails on any other order.
    _ATTN_PARAMS.pack_into(
        buf,
        0,
        q_ptr,
        out_ptr,
        kfp_ptr,
        vfp_ptr,
        fp_mask_ptr,
        win_valid_ptr,
        kcent_ptr,
        vcent_ptr,
        signs_ptr,
        table_ptr,
        part_ptr,
        counters_ptr,
        tfp,
        n_sink,
        win_total,
        g,
        hkv,
        bscale,
        qscale,
        *tier0,
        *tier1,
    )
    if not _ONE_GPU:
        _ONE_GPU.append(torch.cuda.device_count() == 1)
    if _ONE_GPU[0]:
        rc = _cu_launch()(fn_ptr, s_total, bh, 1, 32 * _ATT_WARPS, 1, 1, 0, stream, kp_arr, None)
    else:
        with _OnDevice(index):
            rc = _cu_launch()(fn_ptr, s_total, bh, 1, 32 * _ATT_WARPS, 1, 1, 0, stream, kp_arr, None)
    if rc != 0:
        raise NexusQuantError(f"decode attention: cuLaunchKernel failed with CUDA error {rc}")
    return out
