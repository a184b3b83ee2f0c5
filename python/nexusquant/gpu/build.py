"""Compiling the kernels: ``cuda/nexusquant.cu`` with CuPy's RawModule (NVRTC).

One compiled module per option set (the generic codec; the fast codec for one padded dim and bit
width; decode attention for one padded dim and the bit widths of its tiers), compiled once per
device and cached, with the kernel handles. ``available(device)`` says whether the CUDA path can
run; everything else falls back to the torch/CPU path when it cannot.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from .._core import NexusQuantError

__all__ = ["available", "kernel_source_path"]

_WARPS = 4  # warps per block of the codec kernels (NQ_WARPS)
_FAST_DIMS = (64, 128, 256)  # padded dims of the fast codec and the attention kernels (one Hadamard block)
_SUFFIX = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16"}  # kernel name per dtype
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
