"""Distortion of the E8 codes on unit Gaussian vectors, against Shannon's bound and a scalar quantizer.

    python benches/distortion.py

For 1–4 bits: mean squared error per dimension of nexusquant's codes (head_dim 128, after its
randomized Hadamard rotation; a unit Gaussian vector stays one), Shannon's distortion-rate bound
D(R) = 2^(-2R) at the real rate R (codes plus the fp16 scale), and a plain per-vector uniform
scalar quantizer spending the same bits (b bits per coordinate plus an fp16 scale per vector; its
clipping range is the best multiple of the vector's RMS, found by a sweep, so it is at its best).
"""

from __future__ import annotations

import numpy as np

import nexusquant as nq

DIM = 128
N = 20000


def uniform_scalar(x: np.ndarray, bits: int, clip: float) -> np.ndarray:
    """Per-vector symmetric uniform quantizer: 2^bits levels over ±clip·rms, fp16 step."""
    levels = 2**bits
    rms = np.sqrt((x**2).mean(axis=1, keepdims=True))
    step = (2 * clip * rms / levels).astype(np.float16).astype(np.float32)
    step = np.where(step == 0, 1.0, step)
    q = np.clip(np.floor(x / step), -levels // 2, levels // 2 - 1)
    return (q + 0.5) * step


def main() -> None:
    x = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    print("| bits | bits/dim held | E8 MSE | Shannon D(R) | E8 / Shannon | uniform scalar MSE | E8 gain over scalar |")
    print("|---|---|---|---|---|---|---|")
    for bits in (1, 2, 3, 4):
        codec = nq.E8Codec(DIM, bits, seed=0)
        e8 = float(((codec.decode(codec.encode(x)) - x) ** 2).mean())
        rate = codec.bits_per_dim
        shannon = 2.0 ** (-2 * rate)
        scalar = min(float(((uniform_scalar(x, bits, c) - x) ** 2).mean()) for c in np.arange(0.5, 4.0, 0.05))
        gain_db = 10 * np.log10(scalar / e8)
        print(
            f"| {bits} | {rate:.4f} | {e8:.5f} | {shannon:.5f} | {e8 / shannon:.2f}x | {scalar:.5f} | "
            f"{gain_db:+.2f} dB |"
        )


if __name__ == "__main__":
    main()
