"""Grid search of the codec's scale factor and residual ratio on unit Gaussian vectors.

Reproduces the constants SCALE_FACTOR and RESIDUAL_RATIO in rust/codec.rs:
    python benches/tune_codec.py
prints, per bit width, the best (mse, scale_factor, residual_ratio) found.
"""

import numpy as np

import nexusquant as nq


def mse(x: np.ndarray, bits: int, scale_factor: float, residual_ratio: float | None = None) -> float:
    codec = nq.E8Codec(x.shape[1], bits, 0, scale_factor=scale_factor, residual_ratio=residual_ratio)
    return float(((codec.decode(codec.encode(x)) - x) ** 2).mean())


def main() -> None:
    x = np.random.default_rng(0).standard_normal((20000, 128)).astype(np.float32)
    for bits in (1, 2):
        best = min((mse(x, bits, sf), round(sf, 3)) for sf in np.arange(0.6, 2.4, 0.025))
        print(f"bits={bits}: mse={best[0]:.5f} scale_factor={best[1]}")
    for bits, ratios in ((3, np.arange(0.35, 0.8, 0.025)), (4, np.arange(0.2, 0.36, 0.01))):
        best = min(
            (mse(x, bits, sf, rr), round(sf, 3), round(rr, 3)) for sf in np.arange(0.95, 1.4, 0.025) for rr in ratios
        )
        print(f"bits={bits}: mse={best[0]:.5f} scale_factor={best[1]} residual_ratio={best[2]}")


if __name__ == "__main__":
    main()
