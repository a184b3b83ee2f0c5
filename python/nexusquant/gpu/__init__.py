"""The CUDA path: kernels in cuda/*.cu, compiled once per device with CuPy's RawModule.

``available(device)`` says whether the CUDA path can run (a CUDA device, CuPy, and the kernels);
everything else in nexusquant falls back to the CPU/torch path when it is False.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["available"]


def available(device=None) -> bool:
    """Whether the CUDA kernels can run on ``device`` (default: the current CUDA device)."""
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    if device is not None and getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return _kernels_ready()


def _kernels_ready() -> bool:
    return False
