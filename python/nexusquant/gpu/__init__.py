"""The CUDA path: kernels in ``cuda/nexusquant.cu``, compiled once per device with CuPy's RawModule.

torch CUDA tensors go in and out without copies (CuPy views them through
``__cuda_array_interface__``; bf16 travels as int16 bits). Kernels run on torch's current stream of
the tensor's device, so they order correctly with the model's own work on any GPU of a model split
across several. ``available(device)`` says whether this path can run; everything else falls back to
the torch/CPU path when it cannot.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._core import NexusQuantError

__all__ = ["available", "encode", "decode", "decode_attention_partials", "kernel_source_path"]

_WARPS = 4
_OPTIONS = ("--std=c++17", "--fmad=false", f"-DNQ_WARPS={_WARPS}")
_lock = threading.Lock()
_modules: dict[int, Any] = {}
_failed: dict[int, str] = {}


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
    dev = torch.device(device)
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _module(index: int):
    """The compiled module for CUDA device ``index`` (compiled on first use)."""
    mod = _modules.get(index)
    if mod is not None:
        return mod
    with _lock:
        if index in _modules:
            return _modules[index]
        import cupy

        path = kernel_source_path()
        # The #line directive makes compiler errors point at the real file and line.
        src = f'#line 1 "{path.name}"\n' + path.read_text()
        with cupy.cuda.Device(index):
            mod = cupy.RawModule(code=src, options=_OPTIONS)
            mod.compile()
        _modules[index] = mod
        return mod


def available(device: Any = None) -> bool:
    """Whether the CUDA kernels can run on ``device`` (default: the current CUDA device)."""
    if os.environ.get("NEXUSQUANT_DISABLE_CUDA") == "1":
        return False
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
        warnings.warn(f"nexusquant CUDA kernels failed to build on cuda:{index}; using the torch path: {e}")
        return False
    return True


@functools.lru_cache(maxsize=None)
def _host_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E8P16 magnitude table, parity and arrangement index, read off the Rust codebook."""
    from ..tiers import get_codec

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


@functools.lru_cache(maxsize=None)
def _device_tables(index: int):
    import torch

    a, p, k = _host_tables()
    dev = torch.device("cuda", index)
    return (
        torch.from_numpy(a).to(dev),
        torch.from_numpy(p).to(dev),
        torch.from_numpy(k.view(np.int16)).to(dev),
    )


@functools.lru_cache(maxsize=None)
def _rotation(head_dim: int, bits: int, seed: int, index: int):
    """Signs, block table and per-block scales of a codec's rotation, on device ``index``."""
    import torch

    from ..tiers import get_codec

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


def _cp(t):
    """A CuPy view of a contiguous torch CUDA tensor (bf16 as int16 bits)."""
    import cupy
    import torch

    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cupy.asarray(t)


def _launch(kernel, grid, block, args, device_index: int) -> None:
    import cupy
    import torch

    with cupy.cuda.Device(device_index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device_index).cuda_stream, device_index)
        with stream:
            kernel(grid, block, args)


_SUFFIX = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16"}


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
    mod = _module(index)
    kern = mod.get_function(f"nq_quantize_{suffix}")
    args = (
        _cp(xs), np.int32(n), np.int32(d), np.int32(p), _cp(signs), _cp(blocks), _cp(bscale),
        np.float32(codec.scale_factor), np.float32(codec.residual_ratio or 1.0), np.int32(codec.bits),
        _cp(abs_t), _cp(par_t), _cp(key_t), _cp(codes), _cp(scales), _cp(errors),
    )
    _launch(kern, (math.ceil(n / _WARPS),), (_WARPS * 32,), args, index)
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
    signs, blocks, bscale = _rotation(codec.head_dim, codec.bits, codec.seed, index)
    abs_t, par_t, _ = _device_tables(index)
    kern = _module(index).get_function(f"nq_dequantize_{suffix}")
    args = (
        _cp(c), _cp(s), np.int32(n), np.int32(codec.head_dim), np.int32(codec.padded_dim), _cp(signs),
        _cp(blocks), _cp(bscale), np.float32(codec.residual_ratio or 1.0), np.int32(codec.bits),
        _cp(abs_t), _cp(par_t), _cp(out),
    )
    _launch(kern, (math.ceil(n / _WARPS),), (_WARPS * 32,), args, index)
    return out.reshape(*lead, codec.head_dim)


def fused_supported(padded_dim: int, group: int) -> bool:
    """Shapes the decode-attention kernel handles: 64, 128 or 256 rotated dims, ≤ 8 query heads per KV head."""
    return padded_dim in (64, 128, 256) and group <= 8


def rotate_queries(codec, q):
    """``R q`` for queries ``(..., head_dim)`` in float32: the rotation the keys' codes live in."""
    import torch

    index = _device_index(q.device)
    signs, blocks, bscale = _rotation(codec.head_dim, codec.bits, codec.seed, index)
    rot = _dense_rotation(codec.head_dim, codec.bits, codec.seed, index)
    return torch.matmul(q.float(), rot)


@functools.lru_cache(maxsize=None)
def _dense_rotation(head_dim: int, bits: int, seed: int, index: int):
    """The rotation as a dense ``(head_dim, padded)`` matrix (rows: images of the unit vectors)."""
    import torch

    from ..tiers import get_codec

    codec = get_codec(head_dim, bits, seed)
    eye = np.eye(head_dim, dtype=np.float32)
    return torch.from_numpy(codec.rotate(eye)).to(torch.device("cuda", index))


@functools.lru_cache(maxsize=None)
def dense_inverse_rotation(head_dim: int, bits: int, seed: int, index: int):
    """``R^-1`` as a dense ``(padded, head_dim)`` matrix, for turning rotated accumulators back."""
    import torch

    from ..tiers import get_codec

    codec = get_codec(head_dim, bits, seed)
    eye = np.eye(codec.padded_dim, dtype=np.float32)
    return torch.from_numpy(codec.unrotate(eye)).to(torch.device("cuda", index))


def decode_attention_partials(
    q_rot,
    q_center,
    kcodes,
    kscales,
    kbits: int,
    kres: float,
    vcodes,
    vscales,
    vbits: int,
    vres: float,
    valid: Optional[Any],
    n_splits: Optional[int] = None,
):
    """Partial softmax states of one query per sequence over compressed tokens.

    Parameters
    ----------
    q_rot : torch.Tensor
        float32 ``(B*H_kv, g, P)``: rotated queries times the attention scale.
    q_center : torch.Tensor
        float32 ``(B*H_kv, g)``: scale · q·key_center.
    kcodes, vcodes : torch.Tensor
        uint8 ``(B*H_kv, T, code_bytes)``.
    kscales, vscales : torch.Tensor
        int16 ``(B*H_kv, T)``.
    valid : torch.Tensor or None
        bool ``(B*H_kv, T)``.

    Returns
    -------
    (m, l, acc)
        float32 ``(B*H_kv, S, g)``, ``(B*H_kv, S, g)`` and ``(B*H_kv, S, g, P)``: per split, the max
        score, the sum of exp(score - max) and the rotated-domain value accumulator.
    """
    import torch

    bh, g, p = q_rot.shape
    t = kscales.shape[1]
    index = _device_index(q_rot.device)
    if n_splits is None:
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        n_splits = max(1, min(math.ceil(4 * sms / bh), math.ceil(t / 64)))
    tpw = 32 // (p // 8)
    step = _WARPS * tpw
    chunk = math.ceil(math.ceil(t / n_splits) / step) * step
    n_splits = math.ceil(t / chunk)
    dev = q_rot.device
    m = torch.empty(bh, n_splits, g, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty(bh, n_splits, g, p, dtype=torch.float32, device=dev)
    abs_t, par_t, _ = _device_tables(index)
    kern = _module(index).get_function("nq_decode_attention")
    valid_arg = _cp(valid.to(torch.uint8).contiguous()) if valid is not None else np.uint64(0)
    args = (
        _cp(q_rot.contiguous()), _cp(q_center.contiguous()),
        _cp(kcodes.contiguous()), _cp(kscales.contiguous()), np.int32(kbits),
        _cp(vcodes.contiguous()), _cp(vscales.contiguous()), np.int32(vbits),
        valid_arg, np.int32(t), np.int32(p), np.int32(g), np.int32(chunk),
        np.float32(kres), np.float32(vres), _cp(abs_t), _cp(par_t), _cp(m), _cp(l), _cp(acc),
    )
    _launch(kern, (n_splits, bh), (_WARPS * 32,), args, index)
    return m, l, acc


def decode_attention_partials_reference(codec_k, codec_v, q_rot, q_center, kcodes, kscales, vcodes, vscales, valid):
    """:func:`decode_attention_partials` in plain torch, one split: the reference the kernel is tested
    against, and the path used on CPU tensors when ``cache.FUSED_REFERENCE_ON_CPU`` is set."""
    import torch

    from ..tiers import torch_decode_rotated

    yk = torch_decode_rotated(codec_k, kcodes, kscales)  # (BH, T, P)
    yv = torch_decode_rotated(codec_v, vcodes, vscales)
    s = torch.matmul(q_rot, yk.transpose(-1, -2)) + q_center[..., None]  # (BH, g, T)
    if valid is not None:
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m[..., None]).nan_to_num(0.0)
    return m[:, None], p.sum(-1)[:, None], torch.matmul(p, yv)[:, None]
