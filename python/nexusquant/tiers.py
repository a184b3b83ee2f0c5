"""Where compressed tokens live: a tier holds K and V vectors of a set of tokens per (batch, KV head).

Shapes are ``(batch, kv_heads, tokens, ...)``. A quantized tier holds E8 codes (uint8
``(B, H, T, code_bytes)``) and fp16 scales (int16 bit patterns ``(B, H, T)``); a 16-bit tier holds the
vectors as they came. Every tier also holds each token's sequence index (int32 ``(B, H, T)``: where the
token sat in the uncompressed sequence, for masks and the rotary embedding) and a validity mask
(bool ``(B, H, T)``: rows of a padded batch can hold fewer tokens than others).

Encoding and decoding run in Rust on CPU tensors; tensors on other devices use the CUDA kernels
when available (nexusquant.gpu) and otherwise a torch decoder over the codebook, so nothing depends
on the device being a CPU.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Union

import numpy as np
import torch

from . import gpu
from ._core import NexusQuantError
from .codec import E8Codec, as_codec_input
from .tables import get_codec, torch_decode
from .transform import KeyTransformCode, fit_key_transform

__all__ = ["QuantizedTensor", "TransformCodedKeys", "Tier", "TIER_NAMES", "encode_tensor", "decode_tensor", "get_codec"]

# A layer's tiers, in order: "fine" takes the prompt's best-scored tokens and every generated block,
# "coarse" the demoted ones (fewer bits), "generated" the generated blocks of a layer whose fine keys
# are transform-coded (per-vector E8 codes: the prompt's principal components do not cover the keys
# generated after it, measured in docs/EVAL.md). Files name a tier's arrays and META entry by these
# names; "generated" came after the first files, so a file without it reads as an empty one.
TIER_NAMES = ("fine", "coarse", "generated")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def encode_tensor(codec: E8Codec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E8-encode ``x`` of shape ``(..., head_dim)``.

    Returns
    -------
    codes : torch.Tensor
        uint8 ``(..., code_bytes_per_vector)`` on ``x.device``.
    scales : torch.Tensor
        int16 ``(...)``: the fp16 scales' bit patterns, on ``x.device``.
    """
    lead = x.shape[:-1]
    if x.numel() == 0:
        cb = codec.code_bytes_per_vector
        return (
            torch.empty(*lead, cb, dtype=torch.uint8, device=x.device),
            torch.empty(*lead, dtype=torch.int16, device=x.device),
        )
    if x.device.type != "cpu":
        if gpu.available(x.device):
            return gpu.encode(codec, x)
    arr, dtype = as_codec_input(x.detach().to("cpu").reshape(-1, x.shape[-1]))
    codes, scales = codec.encode_arrays(arr, dtype)
    codes_t = torch.from_numpy(codes).reshape(*lead, -1)
    scales_t = torch.from_numpy(scales.view(np.int16)).reshape(lead)
    return codes_t.to(x.device), scales_t.to(x.device)


def decode_tensor(codec: E8Codec, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Decode codes and scales made by :func:`encode_tensor` into ``(..., head_dim)`` of ``dtype``."""
    lead = scales.shape
    d = codec.head_dim
    if scales.numel() == 0:
        return torch.empty(*lead, d, dtype=dtype, device=codes.device)
    if codes.device.type != "cpu":
        if gpu.available(codes.device):
            return gpu.decode(codec, codes, scales, dtype)
        return torch_decode(codec, codes, scales, dtype)
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise NexusQuantError(f"cannot decode into {dtype}: use float32, float16 or bfloat16")
    c = codes.reshape(-1, codes.shape[-1]).contiguous().numpy()
    s = scales.reshape(-1).contiguous().numpy().view(np.uint16)
    out = codec.decode_arrays(c, s, name)
    t = torch.from_numpy(out)
    if name != "float32":
        t = t.view(torch.int16).view(dtype)
    return t.reshape(*lead, d)


class QuantizedTensor:
    """Vectors ``(B, H, T, head_dim)`` held as E8 codes and scales, or as is for 16 bits.

    A refinement may sit on top of the E8 codes: for some tokens of each batch row and head, the
    error of their code, E8-coded again (``refine_bits``, its own rotation), with the token's index
    (``ref_idx`` ``(B, H, R)``, ``ref_codes``, ``ref_scales``). A value error reaches the output in
    proportion to the attention its token gets, so the most read tokens are refined
    (``value_refine_share``); an entry of scale 0 refines nothing (a padded row's spare slots).
    The index is int16 while the tensor holds fewer than 2^15 tokens, int32 beyond.
    """

    _REFINEMENT = ("ref_idx", "ref_codes", "ref_scales")

    def __init__(self, head_dim: int, bits: int, seed: int, dtype: torch.dtype, refine_bits: int = 0):
        self.head_dim = head_dim
        self.bits = bits
        self.seed = seed
        self.dtype = dtype
        self.codec: Optional[E8Codec] = None if bits == 16 else get_codec(head_dim, bits, seed)
        # Another seed: the refinement's rotation is not the one whose error it codes.
        self.refine_codec: Optional[E8Codec] = (
            get_codec(head_dim, refine_bits, (seed + 1) % 2**64) if refine_bits and self.codec is not None else None
        )
        self.codes: Optional[torch.Tensor] = None
        self.scales: Optional[torch.Tensor] = None
        self.raw: Optional[torch.Tensor] = None
        self.ref_idx: Optional[torch.Tensor] = None  # int16/int32 (B, H, R), token index on this axis
        self.ref_codes: Optional[torch.Tensor] = None  # uint8 (B, H, R, bytes)
        self.ref_scales: Optional[torch.Tensor] = None  # int16 (B, H, R)

    @property
    def length(self) -> int:
        t = self.raw if self.codec is None else self.scales
        return 0 if t is None else t.shape[2]

    @property
    def refined(self) -> int:
        """Refinement entries per batch row and head."""
        return 0 if self.ref_idx is None else self.ref_idx.shape[2]

    def append(self, x: torch.Tensor, refine: Optional[torch.Tensor] = None, refine_count: int = 0) -> None:
        """Quantize ``x`` ``(B, H, T, head_dim)`` and append it along the token axis; with
        ``refine`` ``(B, H, T)`` (higher = refine first, -inf = never: padding), the code error of
        the ``refine_count`` highest-ranked tokens of each row and head is coded again."""
        if self.codec is None:
            self.raw = x if self.raw is None else torch.cat([self.raw, x], dim=2)
            return
        old = self.length
        codes, scales = encode_tensor(self.codec, x)
        if self.codes is None:
            self.codes, self.scales = codes, scales
        else:
            assert self.scales is not None  # set with the codes
            self.codes = torch.cat([self.codes, codes], dim=2)
            self.scales = torch.cat([self.scales, scales], dim=2)
        count = min(int(refine_count), x.shape[2])
        if refine is None or count <= 0 or self.refine_codec is None:
            return
        rank = refine.float()
        top = torch.topk(rank, count, dim=2).indices  # (B, H, R)
        real = torch.isfinite(rank.gather(2, top))
        gather = top[..., None].expand(-1, -1, -1, x.shape[-1])
        error = (x.float() - decode_tensor(self.codec, codes, scales, torch.float32)).gather(2, gather)
        error = error * real[..., None].to(error.dtype)  # nothing to refine in a padding slot
        rc, rs = encode_tensor(self.refine_codec, error)
        rs = torch.where(real, rs, torch.zeros_like(rs))
        # int16 indices while the tier is short enough (2 bytes a refined vector instead of 4).
        wide = old + x.shape[2] > 2**15 or (self.ref_idx is not None and self.ref_idx.dtype == torch.int32)
        idx = (top + old).to(torch.int32 if wide else torch.int16)
        if self.ref_idx is not None and self.ref_idx.dtype != idx.dtype:
            self.ref_idx = self.ref_idx.to(torch.int32)
        if self.ref_idx is None:
            self.ref_idx, self.ref_codes, self.ref_scales = idx, rc, rs
        else:
            assert self.ref_codes is not None and self.ref_scales is not None
            self.ref_idx = torch.cat([self.ref_idx, idx], dim=2)
            self.ref_codes = torch.cat([self.ref_codes, rc], dim=2)
            self.ref_scales = torch.cat([self.ref_scales, rs], dim=2)

    def dequantize(self) -> torch.Tensor:
        """All vectors, ``(B, H, T, head_dim)`` in the model's dtype."""
        if self.codec is None:
            assert self.raw is not None
            return self.raw
        assert self.codes is not None and self.scales is not None
        if self.ref_idx is None:
            return decode_tensor(self.codec, self.codes, self.scales, self.dtype)
        assert self.refine_codec is not None and self.ref_codes is not None and self.ref_scales is not None
        out = decode_tensor(self.codec, self.codes, self.scales, torch.float32)
        fix = decode_tensor(self.refine_codec, self.ref_codes, self.ref_scales, torch.float32)
        out.scatter_add_(2, self.ref_idx.long()[..., None].expand_as(fix), fix)
        return out.to(self.dtype)

    def nbytes(self) -> int:
        held = (self.codes, self.scales, self.raw, self.ref_idx, self.ref_codes, self.ref_scales)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (e.g. an index_select on dim 0) to every held tensor."""
        for name in ("codes", "scales", "raw", *self._REFINEMENT):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


class TransformCodedKeys:
    """Keys ``(B, H, T, head_dim)`` held by the transform coder (:mod:`nexusquant.transform`).

    The KV heads of a token are coded together (one vector of ``H * head_dim``), so every head of a
    batch row must hold the same tokens: the cache selects tokens per layer, not per head, when
    keys are transform-coded. Each batch row is its own prompt and gets its own basis, fitted on
    the first tokens appended (the prompt); later appends (generated blocks) reuse it.
    """

    codec = None  # no E8 codec: the fused E8 decode kernel does not read these codes

    def __init__(self, head_dim: int, rate: float, dtype: torch.dtype):
        self.head_dim = head_dim
        self.rate = rate
        self.bits = rate  # callers test ``bits != 16`` to know that keys are quantized
        self.dtype = dtype
        self.rows: list[list[KeyTransformCode]] = []  # per batch row, the code of each append

    @property
    def length(self) -> int:
        return sum(c.length for c in self.rows[0]) if self.rows else 0

    def append(
        self,
        x: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        metric: Optional[torch.Tensor] = None,
        amortize_tokens: int = 0,
        token_weight: Optional[torch.Tensor] = None,
    ) -> None:
        """Code ``x`` ``(B, H, T, head_dim)``; ``valid`` bool ``(B, T)`` marks the tokens the basis is
        fitted on (padding excluded); ``metric`` ``(B, F, F)`` is the queries' second moment (see
        :func:`~nexusquant.transform.fit_key_transform`), None for plain principal components;
        ``amortize_tokens``: the prompt's tokens the basis will code (chunked prefill), at least;
        ``token_weight`` float ``(B, T)``: each token's weight in the fit (zero for padding, mean 1
        over the real tokens), replacing ``valid`` there."""
        b, h, t, d = x.shape
        # Codes are data, not part of a graph: a forward run without no_grad must not make the
        # basis (an eigendecomposition of the prompt's keys) hold the prefill's autograd graph.
        x = x.detach()
        metric = None if metric is None else metric.detach()
        flat = x.permute(0, 2, 1, 3).reshape(b, t, h * d)
        if not self.rows:
            self.rows = [
                [
                    fit_key_transform(
                        flat[i],
                        self.rate,
                        token_weight[i] if token_weight is not None else None if valid is None else valid[i],
                        None if metric is None else metric[i],
                        amortize_tokens=amortize_tokens,
                    )
                ]
                for i in range(b)
            ]
            return
        for i in range(b):
            self.rows[i].append(self.rows[i][0].encode_more(flat[i]))

    def dequantize(self, center: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All keys, ``(B, H, T, head_dim)`` in the model's dtype, plus ``center`` ``(B, H, 1,
        head_dim)`` (the layer's ``k_center``) where given.

        On CUDA the codes are unpacked by a kernel and the keys rebuilt by one fp16 GEMM per row
        (:mod:`nexusquant.gpu.transform`); elsewhere in float32 by :meth:`KeyTransformCode.decode`.
        """
        if self.rows and gpu.transform_keys_supported(self.rows[0][0].codes.device):
            self.join_appends()
            flat = None if center is None else center.reshape(len(self.rows), -1)  # (B, H * D)
            out = []
            for i, row in enumerate(self.rows):
                # (T, H * D); float32 models get float32 accuracy
                keys = gpu.transform_keys(row[0], None if flat is None else flat[i], self.dtype == torch.float32)
                out.append(keys.reshape(keys.shape[0], -1, self.head_dim).permute(1, 0, 2))
            return torch.stack(out).to(self.dtype)
        out = []
        for row in self.rows:
            keys = torch.cat([c.decode() for c in row], 0)  # (T, H * D)
            out.append(keys.reshape(keys.shape[0], -1, self.head_dim).permute(1, 0, 2))
        keys = torch.stack(out).to(self.dtype)
        return keys if center is None else keys + center

    def join_appends(self) -> None:
        """Hold each row's appends (a chunked prefill's chunks) as one code, as a file restores
        them: the kernel then reads one array per row. Same codes, same bytes."""
        for i, row in enumerate(self.rows):
            if len(row) > 1:
                self.rows[i] = [replace(row[0], codes=torch.cat([c.codes for c in row], 0))]

    def release_analysis(self) -> None:
        """Let go of the factors ``encode_more`` keeps for a chunked prefill's next chunk
        (:attr:`~nexusquant.transform.KeyTransformCode.analysis`): the prompt is coded."""
        for row in self.rows:
            row[0].analysis = None

    def nbytes(self) -> int:
        # The basis, mean, steps and widths are shared by a row's appends: count them once.
        total = 0
        for row in self.rows:
            total += row[0].nbytes() + sum(c.codes.numel() for c in row[1:])
        return total

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch axis: only row selections (index_select / repeat) are supported."""
        probe = fn(torch.arange(len(self.rows))[:, None])[:, 0].tolist()
        self.rows = [list(self.rows[int(i)]) for i in probe]

    def slice_tokens(self, start: int) -> None:
        raise NexusQuantError("transform-coded keys are not sliced: sliding-window layers keep the E8 codec")


class Tier:
    """Keys and values of one tier, with each token's sequence index and validity."""

    def __init__(
        self,
        head_dim: int,
        key_bits: int,
        value_bits: int,
        seed: int,
        dtype: torch.dtype,
        key_rate: Optional[float] = None,
        value_refine_bits: int = 0,
    ):
        self.keys: Union[QuantizedTensor, TransformCodedKeys] = (
            QuantizedTensor(head_dim, key_bits, seed, dtype)
            if key_rate is None
            else TransformCodedKeys(head_dim, key_rate, dtype)
        )
        self.values = QuantizedTensor(head_dim, value_bits, seed, dtype, value_refine_bits)
        # int16/int32 (B, 1, T) where every KV head holds the same tokens (a transform-coded layer
        # keeps or drops a token in all heads at once), else (B, H, T): the positions are counted
        # in the cache's bytes, and held once per head they were 4-6% of them (docs/EVAL.md).
        self._seq: Optional[torch.Tensor] = None
        self._heads = 0
        self.valid: Optional[torch.Tensor] = None  # bool (B, H, T)

    @property
    def seq(self) -> Optional[torch.Tensor]:
        """int16/int32 ``(B, H, T)``: each slot's sequence index (a broadcast view where the heads
        share their tokens), or None where positions are not tracked."""
        held = self._seq
        if held is None or held.shape[1] == self._heads:
            return held
        return held.expand(-1, self._heads, -1)

    @seq.setter
    def seq(self, seq: Optional[torch.Tensor]) -> None:
        if seq is not None:
            self._heads = seq.shape[1]
            if seq.shape[1] > 1 and seq.stride(1) == 0:  # a broadcast view (another tier's ``seq``)
                seq = seq[:, :1].clone()
        self._seq = seq

    @property
    def positions_held(self) -> Optional[torch.Tensor]:
        """The tensor the positions are held in: ``(B, 1, T)`` where the heads share their tokens,
        else ``(B, H, T)``; it changes (object or ``_version``) only when the tier does."""
        return self._seq

    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        seq: Optional[torch.Tensor],
        valid: Optional[torch.Tensor],
        key_metric: Optional[torch.Tensor] = None,
        amortize_tokens: int = 0,
        key_token_weight: Optional[torch.Tensor] = None,
        value_refine: Optional[torch.Tensor] = None,
        value_refine_count: int = 0,
        seq_bound: Optional[int] = None,
        heads_share_tokens: bool = False,
    ) -> None:
        """Add tokens: ``k``, ``v`` ``(B, H, T, D)``; ``seq`` int ``(B, H, T)`` or None when positions
        are not tracked (``seq_bound``: a number above every position, where the caller knows one
        without reading ``seq``, which waits for a GPU; ``heads_share_tokens``: every head holds
        the same tokens, so their positions are held once); ``valid`` bool ``(B, H, T)`` or None
        when every new slot is valid;
        ``key_metric`` float ``(B, F, F)``, the queries' second moment for transform-coded keys;
        ``amortize_tokens`` and ``key_token_weight`` ``(B, T)``: see
        :meth:`TransformCodedKeys.append`; ``value_refine`` and ``value_refine_count``: see
        :meth:`QuantizedTensor.append`."""
        t = k.shape[2]
        if t == 0:
            return
        old = self.length
        if isinstance(self.keys, TransformCodedKeys):
            self.keys.append(k, None if valid is None else valid[:, 0], key_metric, amortize_tokens, key_token_weight)
        else:
            self.keys.append(k)
        self.values.append(v, value_refine, value_refine_count)
        if seq is not None:
            largest = int(seq.max().item()) if seq_bound is None else seq_bound - 1
            held = self._seq
            dtype = torch.int16 if largest < 2**15 and (held is None or held.dtype == torch.int16) else torch.int32
            # A copy either way: a slice of the caller's tensor would keep all of it alive.
            seq = seq[:, :1].to(dtype, copy=True) if heads_share_tokens else seq.to(dtype)
            if held is not None:
                if held.dtype != dtype:
                    held = held.to(torch.int32)
                if held.shape[1] != seq.shape[1]:  # one side per head: hold both per head
                    held, seq = held.expand(-1, k.shape[1], -1), seq.expand(-1, k.shape[1], -1)
                seq = torch.cat([held, seq], dim=2)
            self._seq, self._heads = seq, k.shape[1]
        if valid is not None or self.valid is not None:
            b, h = k.shape[0], k.shape[1]
            if valid is None:
                valid = torch.ones(b, h, t, dtype=torch.bool, device=k.device)
            prev = self.valid if self.valid is not None else torch.ones(b, h, old, dtype=torch.bool, device=k.device)
            self.valid = torch.cat([prev, valid], dim=2)
        self._length = old + t

    @property
    def length(self) -> int:
        return getattr(self, "_length", 0)

    def state_dict(self) -> dict[str, Any]:
        """What the tier holds, by the names a ``.nqkv`` file uses (docs/FORMAT.md) without the
        tier's prefix: ``length``, ``seq``, ``valid`` and per part (``k``, ``v``) ``{part}.raw``
        (a 16-bit part), ``{part}.codes`` and ``{part}.scales`` (an E8 part) or ``{part}.rows``
        (transform-coded keys), and ``{part}.bits``, the part's bit width (16: raw; an E8 part's
        codes are packed at that width). Tensors are the tier's own, not copies."""
        state: dict[str, Any] = {"length": self.length, "seq": self.seq, "valid": self.valid}
        for part, qt in (("k", self.keys), ("v", self.values)):
            state[f"{part}.bits"] = qt.bits
            if isinstance(qt, TransformCodedKeys):
                state[f"{part}.rows"] = qt.rows
            elif qt.codec is None:
                state[f"{part}.raw"] = qt.raw
            else:
                state[f"{part}.codes"], state[f"{part}.scales"] = qt.codes, qt.scales
        if self.values.ref_idx is not None:
            for name in QuantizedTensor._REFINEMENT:
                state[f"v.{name}"] = getattr(self.values, name)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set what :meth:`state_dict` returns (the caller has checked the shapes)."""
        for part, qt in (("k", self.keys), ("v", self.values)):
            if isinstance(qt, TransformCodedKeys):
                qt.rows = state[f"{part}.rows"]
            elif qt.codec is None:
                qt.raw = state[f"{part}.raw"]
            else:
                qt.codes, qt.scales = state[f"{part}.codes"], state[f"{part}.scales"]
        for name in QuantizedTensor._REFINEMENT:
            setattr(self.values, name, state.get(f"v.{name}"))
        self.seq = state["seq"]  # a broadcast view over the heads is held as one row
        self.valid = state["valid"]
        self._length = int(state["length"])

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self._seq, self.valid) if t is not None)
        return self.keys.nbytes() + self.values.nbytes() + extra

    def map_batch(self, fn) -> None:
        self.keys.map_batch(fn)
        self.values.map_batch(fn)
        if self._seq is not None:
            self._seq = fn(self._seq)
        if self.valid is not None:
            self.valid = fn(self.valid)

    def slice_tokens(self, start: int) -> None:
        """Drop the first ``start`` tokens (they are in sequence order)."""
        cut = lambda t: t[:, :, start:].contiguous()  # noqa: E731
        if self.values.ref_idx is not None:
            raise NexusQuantError("internal: refined values are not sliced (sliding-window layers do not refine)")
        if isinstance(self.keys, TransformCodedKeys):
            self.keys.slice_tokens(start)
        self.keys.map_batch(cut)
        self.values.map_batch(cut)
        if self._seq is not None:
            self._seq = cut(self._seq)
        if self.valid is not None:
            self.valid = cut(self.valid)
        self._length = self.length - start
