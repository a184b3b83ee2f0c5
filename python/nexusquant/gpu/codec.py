"""E8 encode and decode of CUDA tensors, bit-identical to the Rust codec.

The codec modules are compiled without fused multiply-adds and write every float operation in the
Rust encoder's order. Two kernel kinds: the fast ones for one Hadamard block (padded dim 64, 128 or
256, one module per dim and bit width) and 16-byte-aligned rows; the generic ones for any head_dim.
"""

from __future__ import annotations

import math

import numpy as np

from .._core import NexusQuantError
from .build import _FAST_DIMS, _SUFFIX, _WARPS, _device_index, _function
from .device_tables import _device_tables, _rotation, _single_block_scale
from .launch import _grid, _launch

__all__ = ["encode", "decode"]


def _fast_codec(codec, *tensors) -> bool:
    """Whether the fast codec kernels apply: one Hadamard block (power-of-two head_dim) and
    16-byte-aligned rows."""
    p = codec.padded_dim
    return p == codec.head_dim and p in _FAST_DIMS and all(t.data_ptr() % 16 == 0 for t in tensors)


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
