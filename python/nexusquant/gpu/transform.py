"""Transform-coded keys (:mod:`nexusquant.transform`) rebuilt on the GPU.

A batch row's keys are ``mean + coefficients @ synthesisᵀ`` with ``synthesis = int8 basis * fp16
column scale``. On CUDA this runs as

1. ``nq_pca_coeffs_*`` (``cuda/nexusquant.cu``): unpack each token's fixed-width codes and
   dequantize them into a ``(T, K)`` coefficient matrix, the step and the basis column's scale
   folded in, so that
2. one tensor-core GEMM (cuBLAS, fp16 inputs, fp32 accumulation) with the int8 basis as fp16
   (exact: int8 fits in fp16) and the mean plus ``k_center`` as its bias gives the keys ``(T, F)``.

The CPU path (:meth:`~nexusquant.transform.KeyTransformCode.decode`) does the same sums in
float32; here the coefficients are rounded to fp16 (a relative error of at most 2^-11, far under
the coefficients' own quantization error). Where the keys could leave fp16's range (checked once
per basis from the widest code of each component) the coefficients and the GEMM stay in float32.

This materializes one batch row's keys (``T x F``, the layer's keys in the model's layout once
the caller permutes them): it is the dequantize path made fast, not a fused attention kernel.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

import numpy as np

from .build import _WARPS, _device_index, _function, available
from .launch import _grid, _launch

if TYPE_CHECKING:
    import torch

    from ..transform import KeyTransformCode

__all__ = ["transform_keys", "transform_keys_supported", "place_keys", "transform_coeffs"]

_FP16_LIMIT = 32768.0  # keys bounded under this rebuild in fp16 (max 65504; margin for the bias)
# Per basis tensor, by id: (a weak reference to it, (bit offsets int32, folded scales float32,
# whether fp16 is safe)). An entry goes when its basis does (weakref.finalize), so it lives as long
# as the batch row's code and costs 8 bytes per kept component. Not a WeakKeyDictionary: that
# compares keys with ==, which a tensor answers elementwise.
_plans: dict[int, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor, bool]]] = {}


def transform_keys_supported(device: torch.device) -> bool:
    """Whether :func:`transform_keys` runs for codes on ``device`` (a CUDA device with the kernels)."""
    return device.type == "cuda" and available(device)


def _plan(code: KeyTransformCode, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    import torch

    key = id(code.basis)
    hit = _plans.get(key)
    if hit is not None and hit[0]() is code.basis:
        return hit[1]
    widths = code.bits.to(torch.int32)
    offset = (torch.cumsum(widths, 0) - widths).to(torch.int32).contiguous()
    scale = (code.step.float() * code.basis_scale.float()).contiguous()
    # |key_i| <= |bias_i| + sum_j |basis_ij| * scale_j * 2^(bits_j - 1): the widest code of each
    # component, dequantized. One host sync per basis (the prompt's), none per decode step.
    widest = scale * torch.exp2(widths.float() - 1)
    bound = bias.abs() + code.basis.float().abs() @ widest
    fp16 = bool(float(bound.max()) < _FP16_LIMIT) if bound.numel() else True
    plan = (offset, scale, fp16)
    _plans[key] = (weakref.ref(code.basis), plan)
    weakref.finalize(code.basis, _plans.pop, key, None)
    return plan


def transform_keys(code: KeyTransformCode, center: Optional[torch.Tensor], exact: bool = False) -> torch.Tensor:
    """Keys of one batch row ``(T, F)``, ``mean + center + coefficients @ synthesisᵀ``, on the GPU.

    Parameters
    ----------
    code : KeyTransformCode
        One row's code (its appends joined), on a CUDA device.
    center : torch.Tensor or None
        ``(F,)``: the layer's key centre of this row (``k_center``), added with the mean.
    exact : bool
        float32 accuracy (a float32 model): each coefficient goes to the GEMM as two fp16 parts
        (its fp16 rounding and the rest), the inner dimension doubled; otherwise one fp16 part,
        whose error (2^-11 relative) lies under a 16-bit model's own rounding of the keys.

    Returns
    -------
    torch.Tensor
        float16 ``(T, F)`` where the keys fit fp16's range and not ``exact``, else float32.
    """
    import torch

    t = code.codes.shape[0]
    f, k = code.basis.shape
    bias = code.mean.float()
    if center is not None:
        bias = bias + center.float()
    offset, scale, fp16 = _plan(code, bias)
    dtype = torch.float16 if fp16 else torch.float32
    if t == 0 or k == 0:
        return bias.to(dtype).expand(t, f).contiguous()
    index = _device_index(code.codes.device)
    codes = code.codes.contiguous()
    # The inner dimension padded to a multiple of 64 with zeros (the kernel writes them): cuBLAS
    # picks an old unaligned fp16 kernel for K = 756 (0.56 ms at 32K tokens on an H200).
    ld = -(-k // 64) * 64
    split = exact and fp16
    coeffs = torch.empty(t, 2 * ld if split else ld, dtype=dtype, device=codes.device)
    fn = _function(index, (("NQ_PCA", 1),), False, "nq_pca_coeffs_f16" if fp16 else "nq_pca_coeffs_f32")
    bits = code.bits.contiguous()
    args = (
        codes.data_ptr(),
        t,  # a Python int goes as a 64-bit integer (long long tokens)
        np.int32(codes.shape[1]),
        np.int32(k),
        np.int32(ld),
        np.int32(split),
        offset.data_ptr(),
        bits.data_ptr(),
        scale.data_ptr(),
        coeffs.data_ptr(),
    )
    _launch(fn, (_grid(t, _WARPS, index),), (32 * _WARPS,), args, index)
    basis = torch.nn.functional.pad(code.basis.to(dtype), (0, ld - k))
    if split:
        basis = torch.cat([basis, basis], 1)
    if split:
        # float32 out (an fp16 one would round the keys again); torch.mm's out_dtype is CUDA-only.
        try:
            return torch.mm(coeffs, basis.T, out_dtype=torch.float32) + bias
        except (TypeError, RuntimeError):  # a torch without it: a float32 GEMM, slower, as exact
            return torch.addmm(bias, coeffs.float(), basis.float().T)
    # int8 entries are exact in fp16; cuBLAS accumulates fp16 products in float32.
    return torch.addmm(bias.to(dtype), coeffs, basis.T)


def transform_coeffs(code: KeyTransformCode, ld: int) -> torch.Tensor:
    """fp16 ``(T, ld)`` coefficients of a batch row's codes (``nq_pca_coeffs_f16``: dequantized,
    the step and the basis column's scale folded in, columns K .. ld zeros), for the fused decode
    kernel, which streams them with 16-byte copies (``ld`` a multiple of 64). The caller checked
    that fp16 holds them (:func:`_plan`)."""
    import torch

    t, k = code.codes.shape[0], code.basis.shape[1]
    coeffs = torch.empty(t, ld, dtype=torch.float16, device=code.codes.device)
    if t == 0:
        return coeffs
    offset, scale, _ = _plan(code, code.mean.float())
    index = _device_index(code.codes.device)
    codes = code.codes.contiguous()
    fn = _function(index, (("NQ_PCA", 1),), False, "nq_pca_coeffs_f16")
    bits = code.bits.contiguous()
    args = (codes.data_ptr(), t, np.int32(codes.shape[1]), np.int32(k), np.int32(ld), np.int32(0),
            offset.data_ptr(), bits.data_ptr(), scale.data_ptr(), coeffs.data_ptr())  # fmt: skip
    _launch(fn, (_grid(t, _WARPS, index),), (32 * _WARPS,), args, index)
    return coeffs


def place_keys(
    keys: torch.Tensor,
    heads: int,
    out: torch.Tensor,
    rope: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None,
    seq: Optional[torch.Tensor] = None,
    positions: Optional[tuple] = None,
) -> torch.Tensor:
    """Rebuilt keys ``(T, heads * D)`` (:func:`transform_keys`) into float32 ``out`` ``(heads, T, D)``,
    the rotary embedding redone where ``rope`` is given: ``(cos, sin, rot)``, float32 tables
    ``(positions, width)`` (width ``rot`` or ``rot / 2`` for a half table) read at ``seq`` int32
    ``(T,)``, split-half layout over the first ``rot`` dims (the caller checked the model's); or
    where ``positions`` is given: ``(positions int32 (N,), inv_freq float32 (rot / 2,), scaling,
    dtype)``, a rotary table of positions whose angles the kernel computes for each token
    (``positions[seq[t]] * inv_freq``, cos/sin times ``scaling`` rounded to ``dtype``, as the fused
    kernel and transformers' default formula do): no rows are made."""
    t = keys.shape[0]
    d = out.shape[-1]
    if t == 0:
        return out
    import torch

    index = _device_index(keys.device)
    keys = keys.contiguous()
    name = "nq_pca_place_f32" if keys.dtype == torch.float32 else "nq_pca_place_f16"
    fn = _function(index, (("NQ_PCA", 1),), False, name)
    cos_ptr = sin_ptr = seq_ptr = pos_ptr = inv_ptr = 0
    width = rot = rdtype = 0
    rscale = 1.0
    if positions is not None:
        pos, inv_freq, rscale, rdt = positions
        assert seq is not None
        pos_ptr, inv_ptr, seq_ptr = pos.data_ptr(), inv_freq.data_ptr(), seq.data_ptr()
        rot = 2 * inv_freq.numel()
        rdtype = {"torch.float16": 1, "torch.bfloat16": 2}.get(str(rdt), 0)
    elif rope is not None:
        cos, sin, rot = rope
        assert seq is not None
        cos_ptr, sin_ptr, seq_ptr, width = cos.data_ptr(), sin.data_ptr(), seq.data_ptr(), cos.shape[-1]
    n = t * heads * d
    args = (
        keys.data_ptr(),
        t,
        np.int32(heads),
        np.int32(d),
        cos_ptr,
        sin_ptr,
        np.int32(width),
        np.int32(rot),
        seq_ptr,
        pos_ptr,
        inv_ptr,
        np.float32(rscale),
        np.int32(rdtype),
        out.data_ptr(),
    )
    _launch(fn, (_grid(n, 32 * _WARPS * 4, index),), (32 * _WARPS,), args, index)
    return out
