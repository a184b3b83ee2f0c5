"""Decode attention over transform-coded keys in one kernel launch (``nq_attend_pca_*``).

For one new query per sequence over a layer whose prompt keys are transform-coded
(:mod:`nexusquant.transform`) and whose values are E8-coded: the kernel rebuilds each tile of keys
for its KV head in shared memory and registers (tensor-core mma over the unpacked coefficients and
the head's int8 basis), redoes RoPE with each token's angle (computed from its position where the
rotary table holds positions), scores them against the query group, and accumulates the values
decoded from their codes in the same pass, flash-decoding style: the tokens are split over enough
blocks to fill the GPU, each writing a partial softmax state, and the last block merges them with
the full-precision part (sinks, window and whatever the caller puts there). The keys never reach
device memory. Layout of the launch, the partial states and the merge: :mod:`.attention`. The
staged build (``STAGED``, the default) first unpacks every token's coefficients once for all KV
heads (``nq_pca_coeffs_f16``, one launch per batch row) and the kernel streams them into shared
memory with ``cp.async``; the first version unpacked the codes in every head's block.

:func:`pca_decode_attention` returns None where the kernel does not apply (the caller then takes
the rebuild path, :meth:`~nexusquant.cache.NexusQuantLayer.decode_tier`).
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
import weakref
from typing import TYPE_CHECKING, Any, Optional

from .._core import NexusQuantError
from .attention import _ATT_DTYPE, _ATTN_PARAMS, _LOG2E, _MAX_SPLITS, _ONE_GPU, _tier_params, _workspace
from .build import _FAST_DIMS, _SUFFIX, _function
from .device_tables import _half_table, _rotation, _single_block_scale
from .launch import _cu_launch, _OnDevice, _sm_count, _stream_ptr
from .transform import _plan as _keys_plan
from .transform import transform_coeffs

if TYPE_CHECKING:
    import torch

    from ..transform import KeyTransformCode

__all__ = ["pca_decode_attention", "fragment_basis", "pair_meta"]

_KC = 128  # NQ_PKC: components per coefficient chunk
_PCS = _KC + 8  # NQ_PCS: halves per token row of a warp's chunk buffer
# NqPcaRow and the tail of NqPcaParams after its NqAttnParams (cuda/nexusquant.cu, static_asserts).
_ROW = struct.Struct("<QQQQQqqQq")
_TAIL = struct.Struct("<QQQQQQqqqiifi")
assert _ROW.size == 72 and _ATTN_PARAMS.size + _TAIL.size == 376
_RDTYPE = {"torch.float32": 0, "torch.float16": 1, "torch.bfloat16": 2}
_tls_buf: list = []
# Per basis tensor, by id: (weak reference, (fragment-ordered basis, meta ints, meta floats, kp)).
_rows: dict[int, tuple[weakref.ref, tuple]] = {}
_index_cache: dict[tuple[int, int], tuple] = {}
_misc: dict[tuple, Any] = {}
_SKC, _SCS = 64, 72  # NQ_SKC, NQ_SCS: components per staged chunk, halves per token row of a slot
# The staged kernel (NQ_PCA_STAGE): coefficients unpacked once per token by nq_pca_coeffs_f16 and
# streamed by cp.async; NEXUSQUANT_PCA_STAGE=0 builds the first version, which unpacks the codes in
# every KV head's block (kept for comparison: benches/pca_keys_bench.py).
STAGED = os.environ.get("NEXUSQUANT_PCA_STAGE") != "0"


def _warps(p: int) -> int:
    # 8 warps where the static shared memory allows (P = 256: the warps' states would take 64 KB).
    return 8 if p <= 128 else 4


def _fragment_index(p: int, kp: int):
    """(rows, cols) int64 ``(Kp/16, P/16, 32, 8)``: which basis entry each byte of the fragment
    order holds: lane (gid, tig) of m-tile mt and k-step ks holds rows gid (bytes 0-3) and gid + 8
    (bytes 4-7), columns 2tig, 2tig+1, 2tig+8, 2tig+9 (the mma's A registers a0/a2 and a1/a3)."""
    import torch

    key = (p, kp)
    hit = _index_cache.get(key)
    if hit is not None:
        return hit
    ks = torch.arange(kp // 16).view(-1, 1, 1, 1)
    mt = torch.arange(p // 16).view(1, -1, 1, 1)
    lane = torch.arange(32).view(1, 1, -1, 1)
    j = torch.arange(8).view(1, 1, 1, -1)
    gid, tig = lane // 4, lane % 4
    rows = mt * 16 + gid + 8 * (j >= 4).long()
    cols = ks * 16 + 2 * tig + (j & 1) + 8 * ((j >> 1) & 1)
    shape = (kp // 16, p // 16, 32, 8)
    hit = _index_cache[key] = (rows.expand(shape).contiguous(), cols.expand(shape).contiguous())
    return hit


def fragment_basis(basis: torch.Tensor, heads: int) -> torch.Tensor:
    """int8 ``(F, K)`` → uint8 ``(H, Kp/16, P/16, 32, 8)``: each head's rows in the kernel's
    fragment order, offset by 128, K padded with zeros to a multiple of 16."""
    import torch

    f, k = basis.shape
    p = f // heads
    kp = -(-k // 16) * 16
    b = torch.nn.functional.pad(basis.to(torch.int16) + 128, (0, kp - k), value=128).to(torch.uint8)
    rows, cols = _fragment_index(p, kp)
    return b.view(heads, p, kp)[:, rows.to(basis.device), cols.to(basis.device)].contiguous()


def pair_meta(code: KeyTransformCode) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per pair of components (2c, 2c+1), K padded to Kp: int32 ``(Kp/2, 2)`` (bit offset of 2c,
    width 2c | width 2c+1 << 8) and float32 ``(Kp/2, 4)`` (0.5 - 2^(w-1) and the scale
    step * basis_scale of each): a coefficient is ``(q + c0) * scale``; padding has width 0."""
    import torch

    k = code.bits.numel()
    kp = -(-k // 16) * 16
    w = torch.nn.functional.pad(code.bits.to(torch.int32), (0, kp - k))
    off = torch.cumsum(w, 0) - w
    scale = torch.nn.functional.pad(code.step.float() * code.basis_scale.float(), (0, kp - k))
    c0 = torch.where(w > 0, 0.5 - torch.exp2(w.float() - 1), torch.zeros_like(scale))
    meta_i = torch.stack([off[0::2], w[0::2] | (w[1::2] << 8)], 1).to(torch.int32).contiguous()
    meta_f = torch.stack([c0[0::2], scale[0::2], c0[1::2], scale[1::2]], 1).contiguous()
    return meta_i, meta_f, kp


def _row_plan(code: KeyTransformCode, heads: int) -> tuple:
    key = id(code.basis)
    hit = _rows.get(key)
    if hit is not None and hit[0]() is code.basis:
        return hit[1]
    frag = fragment_basis(code.basis, heads)
    meta_i, meta_f, kp = pair_meta(code)
    plan: tuple = (frag, meta_i, meta_f, kp, {})  # the last: bias and fp16 safety per k_center
    _rows[key] = (weakref.ref(code.basis), plan)
    weakref.finalize(code.basis, _rows.pop, key, None)
    return plan


def _cached(key: tuple, make):
    hit = _misc.get(key)
    if hit is None:
        if len(_misc) > 4096:
            _misc.clear()
        hit = _misc[key] = make()
    return hit


def _libcuda():
    if not _tls_buf:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.cuFuncGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_void_p]
        buf = ctypes.create_string_buffer(_ATTN_PARAMS.size + _TAIL.size)
        kp_arr = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        _tls_buf.append((lib, buf, kp_arr))
    return _tls_buf[0]


def _kernel(index: int, dtype, p: int, vbits: int, dyn: int) -> Optional[int]:
    """The CUfunction for a dtype, head dim and value width, its dynamic shared memory raised to
    ``dyn`` bytes; None where the device cannot give that much."""
    import torch

    suffix = _SUFFIX[str(dtype)]
    aw = _warps(p)
    defines = (
        ("NQ_ATT_P", p),
        ("NQ_ATT_KB0", vbits),
        ("NQ_ATT_VB0", vbits),
        ("NQ_ATT_KB1", 0),
        ("NQ_ATT_VB1", 0),
        ("NQ_ATT_T", _ATT_DTYPE[suffix]),
        ("NQ_AW", aw),
        ("NQ_ATT_PCA", 1),
    ) + ((("NQ_PCA_STAGE", 1),) if STAGED else ())
    fn = _function(index, defines, False, f"nq_attend_pca_{suffix}")
    key = ("fn", index, defines)
    state = _misc.get(key)
    if state is None:
        lib = _libcuda()[0]
        static = ctypes.c_int()
        lib.cuFuncGetAttribute(ctypes.byref(static), 1, ctypes.c_void_p(fn.ptr))  # SHARED_SIZE_BYTES
        optin = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
        state = _misc[key] = [fn.ptr, static.value, optin, 0]
    if state[1] + dyn > state[2]:
        return None
    if dyn > state[3]:
        rc = _libcuda()[0].cuFuncSetAttribute(ctypes.c_void_p(state[0]), 8, dyn)  # MAX_DYNAMIC_SHARED_SIZE
        if rc != 0:
            return None
        state[3] = dyn
    return state[0]


def pca_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n_sink: int,
    fp_mask: Optional[torch.Tensor],
    win_valid: torch.Tensor,
    codes: list,
    center: Optional[torch.Tensor],
    values: Any,
    valid: Optional[torch.Tensor],
    seq: Optional[torch.Tensor],
    rope: Optional[tuple],
    v_center: Optional[torch.Tensor],
    scaling: float,
) -> Optional[torch.Tensor]:
    """Attention of one query per sequence over one transform-coded tier and the full-precision
    tokens, or None where the kernel does not apply.

    ``query`` ``(B, H_q, 1, D)``; ``key``/``value`` ``(B, H_kv, T_fp, D)`` the full-precision tokens
    (``n_sink`` first, then the window; ``fp_mask`` bool ``(B, H_kv, T_fp)`` or None as in
    :func:`~nexusquant.gpu.decode_attention`); ``codes``: one :class:`KeyTransformCode` per batch row
    (appends joined, T tokens each); ``center`` ``(B, H_kv * D)`` or None (``k_center``); ``values``
    the tier's E8 values (``codes`` ``(B, H_kv, T, bytes)``, ``scales``, ``codec``); ``valid`` bool
    ``(B, H_kv, T)`` or None; ``seq`` int32 ``(B, T)`` each token's index into the rotary table, with
    ``rope`` ``("positions", positions int32 (R, N), inv_freq float32, scaling, dtype)`` or
    ``("rows", cos, sin)`` float32 ``(R, N, width)`` (width D or D/2), or both None (post-RoPE);
    ``v_center`` ``(B, H_kv, 1, D)`` or None. Returns ``(B, 1, H_q, D)``.
    """
    import torch

    b, hq, _, d = query.shape
    hkv, tfp = key.shape[1], key.shape[2]
    g = hq // hkv
    dtype = query.dtype
    vc = values.codec
    if (
        str(dtype) not in _SUFFIX
        or g > 8
        or d not in _FAST_DIMS
        or vc is None
        or vc.padded_dim != d
        or vc.head_dim != d
        or len(codes) != b
    ):
        return None
    t = values.scales.shape[2]
    index = query.get_device()
    rows = []
    kp_cap = 16
    for code in codes:
        if code.codes.shape[0] != t or code.codes.data_ptr() % 4 or code.basis.shape[0] != hkv * d:
            return None
        rows.append(_row_plan(code, hkv))
        kp_cap = max(kp_cap, rows[-1][3])
    aw = _warps(d)
    dyn = d * kp_cap + (aw * 2 * 16 * _SCS * 2 if STAGED else aw * 16 * _PCS * 2)
    fn_ptr = _kernel(index, dtype, d, vc.bits, dyn)
    if fn_ptr is None:
        return None

    biases = []
    for i, (code, plan) in enumerate(zip(codes, rows)):
        ckey = None if center is None else (center.data_ptr(), center._version, i)
        hit = plan[4].get(ckey)
        if hit is None:
            bias = code.mean.float() + (0.0 if center is None else center[i].float())
            hit = plan[4][ckey] = (bias.contiguous(), _keys_plan(code, bias)[2])
        if not hit[1]:
            return None  # keys that could leave fp16's range: the float32 rebuild path
        biases.append(hit)
    coeffs: list = []
    if STAGED:
        # Every token's coefficients once for all KV heads (one launch per batch row; the blocks of
        # the attention kernel then read them through L2, not the codes once per head).
        coeffs = [transform_coeffs(code, -(-code.basis.shape[1] // _SKC) * _SKC) for code in codes]
    row_vals: list[int] = []
    for i, (code, (frag, meta_i, meta_f, kp, _), (bias, _)) in enumerate(zip(codes, rows, biases)):
        row_vals.extend(
            (
                code.codes.data_ptr(),
                frag.data_ptr(),
                meta_i.data_ptr(),
                meta_f.data_ptr(),
                bias.data_ptr(),
                code.codes.shape[1],
                kp,
                coeffs[i].data_ptr() if coeffs else 0,
                coeffs[i].shape[1] if coeffs else 0,
            )
        )

    # The device copy of the rows is a function of the pointers and sizes alone: keyed by them.
    def make_rows():
        buf = bytearray(_ROW.size * b)
        for i in range(b):
            _ROW.pack_into(buf, i * _ROW.size, *row_vals[9 * i : 9 * i + 9])
        host = torch.frombuffer(buf, dtype=torch.uint8)
        return host.to(query.device)

    rows_dev = _cached(("rows", index, tuple(row_vals)), make_rows)

    kind = None if rope is None else rope[0]
    seq_ptr = cos_ptr = sin_ptr = pos_ptr = inv_ptr = 0
    table_rows = table_len = 1
    width = rot = 0
    rscale, rdtype = 1.0, 0
    if rope is not None:
        assert seq is not None
        seq_ptr = seq.data_ptr()
        rot = d
        if kind == "positions":
            _, positions, inv_freq, rscale, rdt = rope
            if inv_freq.numel() * 2 != d:
                return None
            pos_ptr, inv_ptr = positions.data_ptr(), inv_freq.data_ptr()
            table_rows, table_len = positions.shape
            width = d // 2
            rdtype = _RDTYPE.get(str(rdt), 0)
        else:
            _, cos, sin = rope
            if cos.shape[-1] not in (d, d // 2):
                return None
            cos_ptr, sin_ptr = cos.data_ptr(), sin.data_ptr()
            table_rows, table_len, width = cos.shape

    signs = _cached(
        ("signs", index, vc.head_dim, vc.bits, vc.seed), lambda: _rotation(vc.head_dim, vc.bits, vc.seed, index)[0]
    )
    table = _cached(("table", index), lambda: _half_table(index))
    bscale = float(_single_block_scale(d))
    vres = float(vc.residual_ratio or 1.0)

    bh = b * hkv
    sms = _sm_count(index)
    # At most one coded block per SM: the kernel holds one block per SM (168 KB of shared memory
    # at K ~ 700, 203 registers), so more run a second wave. The block over the bf16 sinks and
    # window (the +1 of s_total) is not counted: it reads a few tokens and frees its SM at once.
    # Leaving it an SM of its own (sms // bh - 1) was 6-8% slower on an H200 at 8 KV heads (fused
    # row, 32K / 128K tokens: 0.52 / 1.87 ms against 0.47-0.50 / 1.74-1.76 ms); two to four waves
    # of smaller chunks were no faster (docs/GPU.md, benches/results/pca_keys_bench_occupancy_*).
    splits = max(1, min(_MAX_SPLITS - 1, sms // bh))
    tile = 16 * aw
    chunk = max(tile, math.ceil(math.ceil(t / splits) / tile) * tile)
    count = math.ceil(t / chunk)
    s_total = count + 1
    stream = _stream_ptr(index)
    ws = _workspace(index, stream, bh, bh * s_total * (16 + 8 * d))

    if key.dtype != dtype:
        key, value = key.to(dtype), value.to(dtype)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    vcent_ptr = 0
    if v_center is not None:
        v_center = v_center.to(dtype).contiguous()
        vcent_ptr = v_center.data_ptr()
    out = torch.empty(b, 1, hq, d, dtype=dtype, device=query.device)
    vcodes, vscales = values.codes, values.scales
    if vcodes.data_ptr() & 15:
        return None
    lib, buf, kp_arr = _libcuda()
    tier0 = (vcodes.data_ptr(), vscales.data_ptr(), vcodes.data_ptr(), vscales.data_ptr(),
             0 if valid is None else valid.data_ptr(), t, count, chunk, 1.0, vres)  # fmt: skip
    tier1 = _tier_params(None, tokens=0, splits=0, chunk=chunk, kres=1.0, vres=1.0)
    _ATTN_PARAMS.pack_into(
        buf,
        0,
        query.data_ptr(),
        out.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        0 if fp_mask is None else fp_mask.data_ptr(),
        win_valid.data_ptr(),
        0,  # kcent: the rebuilt keys hold mean + k_center
        vcent_ptr,
        signs.data_ptr(),
        table.data_ptr(),
        ws[4],
        ws[5],
        tfp,
        n_sink,
        win_valid.shape[1],
        g,
        hkv,
        bscale,
        scaling * _LOG2E,
        *tier0,
        *tier1,
    )
    _TAIL.pack_into(
        buf,
        _ATTN_PARAMS.size,
        rows_dev.data_ptr(),
        seq_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        inv_ptr,
        table_rows,
        table_len,
        kp_cap,
        width,
        rot,
        float(rscale),
        rdtype,
    )
    if not _ONE_GPU:
        _ONE_GPU.append(torch.cuda.device_count() == 1)
    launch = _cu_launch()
    if _ONE_GPU[0]:
        rc = launch(fn_ptr, s_total, bh, 1, 32 * aw, 1, 1, dyn, stream, kp_arr, None)
    else:
        with _OnDevice(index):
            rc = launch(fn_ptr, s_total, bh, 1, 32 * aw, 1, 1, dyn, stream, kp_arr, None)
    if rc != 0:
        raise NexusQuantError(f"decode attention (transform-coded keys): cuLaunchKernel failed with CUDA error {rc}")
    return out
