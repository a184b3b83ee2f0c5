"""The codecs and their tables, built once per (head_dim, bits, seed) and shared by every user.

A leaf of the package (it imports only the codec): the tiers, the attention's decode reference and
the CUDA module all take the codecs, the rotation as dense matrices and the E8 codebooks from here,
so each is built in one place. Shapes: the rotation ``(head_dim, padded_dim)`` (row ``i`` is the
image of the unit vector ``e_i``), its inverse ``(padded_dim, head_dim)``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .codec import E8Codec

__all__ = ["get_codec", "dense_rotation", "dense_rotation_torch", "torch_decode_rotated", "torch_decode"]


@functools.lru_cache(maxsize=64)
def get_codec(head_dim: int, bits: int, seed: int) -> E8Codec:
    """The codec for a head dimension, bit width and seed (built once, shared by all layers)."""
    return E8Codec(head_dim, bits, seed)


@functools.lru_cache(maxsize=64)
def dense_rotation(head_dim: int, bits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The codec's rotation and its inverse as dense float32 matrices: ``(head_dim, padded_dim)``
    and ``(padded_dim, head_dim)``. Read-only: every caller shares them."""
    codec = get_codec(head_dim, bits, seed)
    rot = codec.rotate(np.eye(head_dim, dtype=np.float32))
    inv = codec.unrotate(np.eye(codec.padded_dim, dtype=np.float32))
    rot.flags.writeable = False
    inv.flags.writeable = False
    return rot, inv


@functools.lru_cache(maxsize=64)
def dense_rotation_torch(head_dim: int, bits: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dense_rotation` as float32 torch tensors on ``device``."""
    rot, inv = dense_rotation(head_dim, bits, seed)
    return torch.tensor(rot, device=device), torch.tensor(inv, device=device)


@functools.lru_cache(maxsize=16)
def _torch_tables(head_dim: int, bits: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Codebooks (every codeword, rotated domain, scale 1) and the inverse rotation as dense tensors."""
    codec = get_codec(head_dim, bits, seed)

    def book(n_codes: int, code_bytes: int, stage_bits: int) -> torch.Tensor:
        # Decode every code of one 8-dimensional group at scale 1 (fp16 0x3C00), in the rotated domain.
        probe = get_codec(8, stage_bits, 0)
        codes = np.arange(n_codes, dtype="<u4").view(np.uint8).reshape(n_codes, 4)[:, :code_bytes]
        ones = np.full(n_codes, 0x3C00, dtype=np.uint16)
        return torch.from_numpy(probe.decode_rotated(np.ascontiguousarray(codes), ones))

    book16 = book(65536, 2, 2)
    book8 = book(256, 1, 1)
    inv_rot = torch.tensor(dense_rotation(codec.head_dim, codec.bits, codec.seed)[1])
    return book16.to(device), book8.to(device), inv_rot.to(device)


def torch_decode_rotated(codec: E8Codec, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Scaled codewords before the inverse rotation, float32 ``(..., padded_dim)``, on any device."""
    book16, book8, _ = _torch_tables(codec.head_dim, codec.bits, codec.seed, str(codes.device))
    lead = scales.shape
    g = codec.padded_dim // 8
    c = codes.reshape(-1, codes.shape[-1]).to(torch.int64)
    s = scales.reshape(-1).view(torch.float16).to(torch.float32)

    def u16(part: torch.Tensor) -> torch.Tensor:
        return part[:, 0::2] | (part[:, 1::2] << 8)

    bits = codec.bits
    if bits == 1:
        z = book8[c[:, :g]]
    else:
        z = book16[u16(c[:, : 2 * g])]
        if bits == 3:
            z = z + codec.residual_ratio * book8[c[:, 2 * g : 3 * g]]
        elif bits == 4:
            z = z + codec.residual_ratio * book16[u16(c[:, 2 * g : 4 * g])]
    return (z.reshape(-1, codec.padded_dim) * s[:, None]).reshape(*lead, codec.padded_dim)


def torch_decode(codec: E8Codec, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Decode on any torch device through codebook lookups and a dense inverse rotation."""
    _, _, inv_rot = _torch_tables(codec.head_dim, codec.bits, codec.seed, str(codes.device))
    y = torch_decode_rotated(codec, codes, scales)
    return (y @ inv_rot).to(dtype)
