"""The tables the kernels read, built once per device from the Rust codebook and the codecs'
rotations (``functools.cache``: one copy per argument set, shared by every launch)."""

from __future__ import annotations

import functools

import numpy as np

from ..tables import dense_rotation, get_codec

__all__ = ["dense_inverse_rotation"]


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
def _dense_rotation(head_dim: int, bits: int, seed: int, index: int):
    """The rotation as a dense ``(head_dim, padded)`` matrix (rows: images of the unit vectors)."""
    import torch

    return torch.tensor(dense_rotation(head_dim, bits, seed)[0], device=torch.device("cuda", index))


@functools.cache
def dense_inverse_rotation(head_dim: int, bits: int, seed: int, index: int):
    """``R^-1`` as a dense ``(padded, head_dim)`` matrix, for turning rotated accumulators back."""
    import torch

    return torch.tensor(dense_rotation(head_dim, bits, seed)[1], device=torch.device("cuda", index))
