"""The CUDA path: kernels in ``cuda/nexusquant.cu``, compiled with CuPy's RawModule (NVRTC).

One compiled module per option set (the generic codec; the fast codec for one padded dim and bit
width; decode attention for one padded dim and the bit widths of its tiers), compiled once per
device and cached, with the kernel handles. torch CUDA tensors go in and out without copies:
kernels take their raw pointers and run on torch's current stream of the tensor's device, so they
order correctly with the model's own work on any GPU of a model split across several.
``available(device)`` says whether this path can run; everything else falls back to the torch/CPU
path when it cannot.

Decode attention is launched through the driver (``cuLaunchKernel``) with its ~40 parameters in one
struct passed by value: CuPy's launcher takes one Python object per parameter, and at batch 1 that
per-call host time is a large part of a decode step (measured: docs/GPU.md).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .._core import NexusQuantError
from ..tables import dense_rotation, get_codec, torch_decode_rotated

__all__ = [
    "available",
    "encode",
    "decode",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_partials_reference",
    "fused_supported",
    "kernel_source_path",
]

_WARPS = 4  # warps per block of the codec kernels (NQ_WARPS)
_FAST_DIMS = (64, 128, 256)
_lock = threading.Lock()
_modules: dict[tuple, Any] = {}
_functions: dict[tuple, Any] = {}
_failed: dict[int, str] = {}
_available: dict[Any, bool] = {}


def kernel_source_path() -> Path:
    """The .cu file, shipped inside the package (``nexusquant/cuda``; the repository's top-level
    ``cuda/`` links there)."""
    path = Path(__file__).resolve().parent.parent / "cuda" / "nexusquant.cu"
    if not path.exists():
        raise NexusQuantError(f"CUDA source {path} is missing from the installation")
    return path


def _device_index(device: Any) -> int:
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _options(defines: tuple, exact: bool) -> tuple:
    # exact: the codec modules must not fuse multiply-adds (bit-identical codes with the CPU).
    opts = ["--std=c++17", f"-DNQ_WARPS={_WARPS}"] + [f"-D{k}={v}" for k, v in defines]
    if exact:
        opts.append("--fmad=false")
    return tuple(opts)


def _module(index: int, defines: tuple = (), exact: bool = True):
    """The module compiled with ``defines`` for CUDA device ``index`` (compiled on first use)."""
    key = (index, defines, exact)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        if key in _modules:
            return _modules[key]
        import cupy

        path = kernel_source_path()
        # The #line directive makes compiler errors point at the real file and line.
        src = f'#line 1 "{path.name}"\n' + path.read_text()
        with cupy.cuda.Device(index):
            mod = cupy.RawModule(code=src, options=_options(defines, exact))
            mod.compile()
        _modules[key] = mod
        return mod


def _function(index: int, defines: tuple, exact: bool, name: str):
    """A loaded kernel (cupy ``Function``: ``.ptr`` is the CUfunction), cached per device."""
    key = (index, defines, exact, name)
    fn = _functions.get(key)
    if fn is None:
        import cupy

        mod = _module(index, defines, exact)
        with cupy.cuda.Device(index):
            fn = mod.get_function(name).kernel
        _functions[key] = fn
    return fn


def available(device: Any = None) -> bool:
    """Whether the CUDA kernels can run on ``device`` (default: the current CUDA device)."""
    if os.environ.get("NEXUSQUANT_DISABLE_CUDA") == "1":
        return False
    hit = _available.get(device)
    if hit is not None:
        return hit
    ok = _probe(device)
    _available[device] = ok
    return ok


def _probe(device: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    index = _device_index(device)
    if index in _failed:
        return False
    try:
        _module(index)
    except Exception as e:  # a compile failure disables the CUDA path, loudly once
        import warnings

        _failed[index] = str(e)
        # stacklevel 1: the caller is nexusquant's own dispatch, not user code.
        warnings.warn(
            f"nexusquant CUDA kernels failed to build on cuda:{index}; using the torch path: {e}", stacklevel=1
        )
        return False
    return True


@functools.cache
def _host_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E8P16 magnitude table, parity and arrangement index, read off the Rust codebook."""
    probe = get_codec(8, 2, 0)
    codes = np.zeros((256, 2), dtype=np.uint8)
    codes[:, 0] = np.arange(256)  # pattern i, no sign bits, shift +1/4
    vals = probe.decode_rotated(codes, np.full(256, 0x3C00, dtype=np.uint16))  # scale 1.0
    signed = vals - 0.25
    abs_table = np.abs(signed).astype(np.float32)
    parity = (signed[:, 7] < 0).astype(np.uint8)  # no stored sign bits: coordinate 7 carries the parity
    digits = np.rint(abs_table - 0.5).astype(np.int64)  # 1/2, 3/2, 5/2 -> 0, 1, 2
    keys = (digits * (3 ** np.arange(8))).sum(1)
    key_to_index = np.full(6561, 0xFFFF, dtype=np.uint16)
    key_to_index[keys] = np.arange(256, dtype=np.uint16)
    return abs_table.reshape(-1), parity, key_to_index


@functools.cache
def _device_tables(index: int):
    import torch

    a, p, k = _host_tables()
    dev = torch.device("cuda", index)
    return (
        torch.from_numpy(a).to(dev),
        torch.from_numpy(p).to(dev),
        torch.from_numpy(k.view(np.int16)).to(dev),
    )


@functools.cache
def _half_table(index: int):
    """[256] x 16 bytes: a pattern's 8 magnitudes as fp16, coordinate 7 negated where the pattern's
    parity bit is set (the attention kernel then derives the eighth sign from the 7 stored ones)."""
    import torch

    a, p, _ = _host_tables()
    t = a.reshape(256, 8).astype(np.float16)
    t[:, 7] = np.where(p == 1, -t[:, 7], t[:, 7])
    return torch.from_numpy(t.view(np.uint8).copy()).to(torch.device("cuda", index))


@functools.cache
def _rotation(head_dim: int, bits: int, seed: int, index: int):
    """Signs, block table and per-block scales of a codec's rotation, on device ``index``."""
    import torch

    codec = get_codec(head_dim, bits, seed)
    passes = codec.blocks
    table = [len(passes)]
    scales = []
    for blocks in passes:
        table.append(len(blocks))
        for off, n in blocks:
            table += [off, n]
            scales.append(np.float32(1.0) / np.sqrt(np.float32(n)))  # as the CPU computes it
    dev = torch.device("cuda", index)
    return (
        torch.from_numpy(np.asarray(codec.signs, dtype=np.float32)).to(dev),
        torch.tensor(table, dtype=torch.int32, device=dev),
        torch.tensor(np.asarray(scales, dtype=np.float32), device=dev),
    )


@functools.cache
def _single_block_scale(padded: int) -> np.float32:
    """1/sqrt(P) as the CPU computes it, for a rotation that is one Hadamard block."""
    return np.float32(1.0) / np.sqrt(np.float32(padded))


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


class _RawStream:
    """What cupy's Function launcher needs of a stream: its handle."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


def _stream_ptr(index: int) -> int:
    import torch

    try:
        return torch._C._cuda_getCurrentRawStream(index)
    except AttributeError:  # older torch
        return torch.cuda.current_stream(index).cuda_stream


class _OnDevice:
    """Make ``index`` the current CUDA device for a launch, only if it is not already."""

    __slots__ = ("index", "prev")

    def __init__(self, index: int):
        self.index = index
        self.prev = None

    def __enter__(self):
        import torch

        cur = torch.cuda.current_device()
        if cur != self.index:
            self.prev = cur
            torch.cuda.set_device(self.index)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            import torch

            torch.cuda.set_device(self.prev)
        return False


def _launch(fn, grid, block, args, index: int) -> None:
    with _OnDevice(index):
        fn(grid, block, args, 0, _RawStream(_stream_ptr(index)))


_SUFFIX = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16"}
_ATT_DTYPE = {"f32": 0, "f16": 1, "bf16": 2}  # NQ_ATT_T


def _fast_codec(codec, *tensors) -> bool:
    """Whether the fast codec kernels apply: one Hadamard block (power-of-two head_dim) and
    16-byte-aligned rows."""
    p = codec.padded_dim
    return p == codec.head_dim and p in _FAST_DIMS and all(t.data_ptr() % 16 == 0 for t in tensors)


def _grid(n: int, vectors_per_block: int, index: int) -> int:
    # Grid-stride kernels: enough blocks to fill the device a few times over, never more than needed.
    return max(1, min(math.ceil(n / vectors_per_block), 16 * _sm_count(index)))


def encode(codec, x):
    """E8-encode a CUDA tensor ``(..., head_dim)``: codes uint8 ``(..., code_bytes)``, scales int16 ``(...)``.

    Codes equal the Rust encoder's on the same input (same float operations in the same order).
    """
    import torch

    suffix = _SUFFIX.get(str(x.dtype))
    if suffix is None:
        raise NexusQuantError(f"unsupported dtype {x.dtype}: use float32, float16 or bfloat16")
    index = _device_index(x.device)
    lead = x.shape[:-1]
    xs = x.reshape(-1, x.shape[-1]).contiguous()
    n, d = xs.shape
    p = codec.padded_dim
    codes = torch.empty(n, codec.code_bytes_per_vector, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n, dtype=torch.int16, device=x.device)
    errors = torch.zeros(2, dtype=torch.int32, device=x.device)
    signs, blocks, bscale = _rotation(codec.head_dim, codec.bits, codec.seed, index)
    abs_t, par_t, key_t = _device_tables(index)
    rr = np.float32(codec.residual_ratio or 1.0)
    if n == 0:
        return codes.reshape(*lead, -1), scales.reshape(lead)
    if _fast_codec(codec, xs):
        fn = _function(index, (("NQ_CODEC_P", p), ("NQ_CODEC_BITS", codec.bits)), True, f"nq_quantize_fast_{suffix}")
        args = (
            xs.data_ptr(),
            n,
            signs.data_ptr(),
            _single_block_scale(p),
            np.float32(codec.scale_factor),
            rr,
            abs_t.data_ptr(),
            par_t.data_ptr(),
            key_t.data_ptr(),
            codes.data_ptr(),
            scales.data_ptr(),
            errors.data_ptr(),
        )
        _launch(fn, (_grid(n, _WARPS * (256 // p), index),), (_WARPS * 32,), args, index)
    else:
        fn = _function(index, (), True, f"nq_quantize_{suffix}")
        args = (
            xs.data_ptr(),
            np.int32(n),
            np.int32(d),
            np.int32(p),
            signs.data_ptr(),
            blocks.data_ptr(),
            bscale.data_ptr(),
            np.float32(codec.scale_factor),
            rr,
            np.int32(codec.bits),
            abs_t.data_ptr(),
            par_t.data_ptr(),
            key_t.data_ptr(),
            codes.data_ptr(),
            scales.data_ptr(),
            errors.data_ptr(),
        )
        _launch(fn, (math.ceil(n / _WARPS),), (_WARPS * 32,), args, index)
    err = errors.tolist()
    if err[0]:
        raise NexusQuantError(f"vector {err[0] - 1} holds NaN or infinity")
    if err[1]:
        raise NexusQuantError(f"vector {err[1] - 1}'s RMS is beyond what an fp16 scale can hold")
    return codes.reshape(*lead, -1), scales.reshape(lead)


def decode(codec, codes, scales, dtype):
    """Decode on the GPU into ``(..., head_dim)`` of ``dtype`` (bit-identical to the Rust decoder)."""
    import torch

    suffix = _SUFFIX.get(str(dtype))
    if suffix is None:
        raise NexusQuantError(f"cannot decode into {dtype}: use float32, float16 or bfloat16")
    index = _device_index(codes.device)
    lead = scales.shape
    c = codes.reshape(-1, codes.shape[-1]).contiguous()
    s = scales.reshape(-1).contiguous()
    n = s.shape[0]
    out = torch.empty(n, codec.head_dim, dtype=dtype, device=codes.device)
    if n == 0:
        return out.reshape(*lead, codec.head_dim)
    signs, blocks, bscale = _rotation(codec.head_dim, codec.bits, codec.seed, index)
    abs_t, par_t, _ = _device_tables(index)
    rr = np.float32(codec.residual_ratio or 1.0)
    p = codec.padded_dim
    if _fast_codec(codec, out):
        fn = _function(index, (("NQ_CODEC_P", p), ("NQ_CODEC_BITS", codec.bits)), True, f"nq_dequantize_fast_{suffix}")
        args = (
            c.data_ptr(),
            s.data_ptr(),
            n,
            signs.data_ptr(),
            _single_block_scale(p),
            rr,
            abs_t.data_ptr(),
            par_t.data_ptr(),
            out.data_ptr(),
        )
        _launch(fn, (_grid(n, _WARPS * (256 // p), index),), (_WARPS * 32,), args, index)
    else:
        fn = _function(index, (), True, f"nq_dequantize_{suffix}")
        args = (
            c.data_ptr(),
            s.data_ptr(),
            np.int32(n),
            np.int32(codec.head_dim),
            np.int32(p),
            signs.data_ptr(),
            blocks.data_ptr(),
            bscale.data_ptr(),
            rr,
            np.int32(codec.bits),
            abs_t.data_ptr(),
            par_t.data_ptr(),
            out.data_ptr(),
        )
        _launch(fn, (math.ceil(n / _WARPS),), (_WARPS * 32,), args, index)
    return out.reshape(*lead, codec.head_dim)


def fused_supported(padded_dim: int, group: int) -> bool:
    """Shapes the decode-attention kernel handles: 64, 128 or 256 rotated dims, ≤ 8 query heads per KV head."""
    return padded_dim in _FAST_DIMS and group <= 8


# ----------------------------------------------------------------------------- decode attention
# The kernel takes one struct, NqAttnParams (nexusquant.cu): 12 pointers, 5 int64, 2 floats, then
# two tiers of 5 pointers, 3 int64, 2 floats; 288 bytes (the kernel static_asserts the layout).
# It is packed with one precompiled struct.pack_into per call: setting ctypes fields one by one
# cost ~45 us of host time per call, more than the kernel itself at 8K tokens.
_ATTN_PARAMS = struct.Struct("<12Q5q2f" + "5Q3q2f" * 2)
assert _ATTN_PARAMS.size == 288
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


@functools.cache
def _cu_launch():
    lib = ctypes.CDLL("libcuda.so.1")
    f = lib.cuLaunchKernel
    f.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    f.restype = ctypes.c_int
    return f


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
    t1 = tiers[1] if len(tiers) > 1 else (None,) * 7
    key = (index, dtype, tiers[0][5], tiers[0][6], t1[5], t1[6], len(tiers))
    hit = _plans.get(key)
    if hit is not None:
        return hit
    kc0 = tiers[0][5]
    p = kc0.padded_dim
    suffix = _SUFFIX.get(str(dtype))
    if suffix is None:
        raise NexusQuantError(f"decode attention: unsupported dtype {dtype}")
    if len(tiers) > 2 or p != kc0.head_dim or p not in _FAST_DIMS:
        raise NexusQuantError(f"decode attention: unsupported shape (head_dim {kc0.head_dim}, {len(tiers)} tiers)")
    if any(t[5].head_dim != kc0.head_dim or t[5].seed != kc0.seed or t[6].seed != kc0.seed for t in tiers):
        raise NexusQuantError("decode attention: all tiers must share one rotation (head_dim and seed)")
    bits = [b for t in tiers for b in (t[5].bits, t[6].bits)] + [0, 0]
    defines = (
        ("NQ_ATT_P", p),
        ("NQ_ATT_KB0", bits[0]),
        ("NQ_ATT_VB0", bits[1]),
        ("NQ_ATT_KB1", bits[2]),
        ("NQ_ATT_VB1", bits[3]),
        ("NQ_ATT_T", _ATT_DTYPE[suffix]),
        ("NQ_AW", _ATT_WARPS),
    )
    fn = _function(index, defines, False, f"nq_attend_{suffix}")
    signs = _rotation(kc0.head_dim, kc0.bits, kc0.seed, index)[0]
    res = tuple(float(c.residual_ratio or 1.0) for t in tiers for c in (t[5], t[6])) + (1.0, 1.0)
    plan = _plans[key] = (
        fn.ptr,
        signs.data_ptr(),
        _half_table(index).data_ptr(),
        float(_single_block_scale(p)),
        p,
        res,
    )
    return plan


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
    tiers : sequence of tuples
        One or two ``(kcodes, kscales, vcodes, vscales, valid, kcodec, vcodec)``: codes uint8
        ``(B, H_kv, T, code_bytes)``, scales int16 ``(B, H_kv, T)``, valid bool ``(B, H_kv, T)`` or None.
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
    kc_ptr = vc_ptr = 0
    if k_center is not None:
        if k_center.dtype != dtype:
            k_center = k_center.to(dtype)
            v_center = v_center.to(dtype)
        k_center = k_center.contiguous()
        v_center = v_center.contiguous()
        kc_ptr, vc_ptr = k_center.data_ptr(), v_center.data_ptr()
    stream = _stream_ptr(index)
    t0 = tiers[0]
    t1 = tiers[1] if len(tiers) > 1 else None
    tokens = (t0[1].shape[2],) if t1 is None else (t0[1].shape[2], t1[1].shape[2])
    chunk, counts, s_total = _splits(tokens, bh, index, p)
    ws = _workspace(index, stream, bh, bh * s_total * (16 + 8 * p))
    if out is None:
        out = torch.empty(b, 1, hq, d, dtype=dtype, device=query.device)
    vals = [
        query.data_ptr(),
        out.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        fp_mask.data_ptr() if fp_mask is not None else 0,
        win_valid.data_ptr(),
        kc_ptr,
        vc_ptr,
        signs_ptr,
        table_ptr,
        ws[4],
        ws[5],
        tfp,
        n_sink,
        win_valid.shape[1],
        g,
        hkv,
        bscale,
        scaling * _LOG2E,
    ]
    for i, t in enumerate((t0, t1)):
        if t is None:
            vals += [0, 0, 0, 0, 0, 0, 0, chunk, 1.0, 1.0]
            continue
        kcodes, vcodes = t[0], t[2]
        kp, vp = kcodes.data_ptr(), vcodes.data_ptr()
        if (kp | vp) & 15:
            raise NexusQuantError("decode attention: code arrays must be 16-byte aligned")
        valid = t[4]
        vals += [
            kp,
            t[1].data_ptr(),
            vp,
            t[3].data_ptr(),
            valid.data_ptr() if valid is not None else 0,
            tokens[i],
            counts[i],
            chunk,
            res[2 * i],
            res[2 * i + 1],
        ]
    buf, kp_arr = _param_buffer()
    _ATTN_PARAMS.pack_into(buf, 0, *vals)
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


# ----------------------------------------------------------------------------- references
def rotate_queries(codec, q):
    """``R q`` for queries ``(..., head_dim)`` in float32: the rotation the keys' codes live in."""
    import torch

    index = _device_index(q.device)
    rot = _dense_rotation(codec.head_dim, codec.bits, codec.seed, index)
    return torch.matmul(q.float(), rot)


@functools.cache
def _dense_rotation(head_dim: int, bits: int, seed: int, index: int):
    """The rotation as a dense ``(head_dim, padded)`` matrix (rows: images of the unit vectors)."""
    import torch

    return torch.tensor(dense_rotation(head_dim, bits, seed)[0], device=torch.device("cuda", index))


@functools.cache
def dense_inverse_rotation(head_dim: int, bits: int, seed: int, index: int):
    """``R^-1`` as a dense ``(padded, head_dim)`` matrix, for turning rotated accumulators back."""
    import torch

    return torch.tensor(dense_rotation(head_dim, bits, seed)[1], device=torch.device("cuda", index))


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
    """:func:`decode_attention` in float64 torch over the dequantized codes (for tests).

    ``fp_allowed`` bool ``(B, H_kv, T_fp)``; other arguments as for :func:`decode_attention`.
    Returns float64 ``(B, 1, H_q, D)``.
    """
    import torch

    b, hq, _, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    ks, vs, allowed = [key.double()], [value.double()], [fp_allowed]
    for kcodes, kscales, vcodes, vscales, valid, kc, vc in tiers:
        k = decode(kc, kcodes, kscales, torch.float32).double()
        v = decode(vc, vcodes, vscales, torch.float32).double()
        if k_center is not None:
            k = k + k_center.double()
            v = v + v_center.double()
        ks.append(k)
        vs.append(v)
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
