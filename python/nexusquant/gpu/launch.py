"""Launching kernels on the right device and stream.

torch CUDA tensors go in and out without copies: kernels take their raw pointers and run on torch's
current stream of the tensor's device, so they order correctly with the model's own work on any GPU
of a model split across several. The codec kernels go through CuPy's ``Function`` launcher
(:func:`_launch`); decode attention calls the driver's ``cuLaunchKernel`` itself
(:func:`_cu_launch`; why: :mod:`nexusquant.gpu.attention`).
"""

from __future__ import annotations

import ctypes
import functools
import math


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


class _RawStream:
    """What cupy's Function launcher needs of a stream: its handle."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


def _stream_ptr(index: int) -> int:
    import torch

    try:
        return torch._C._cuda_getCurrentRawStream(index)
    except AttributeError:  # older torch
        return torch.cuda.current_stream(index).cuda_stream


class _OnDevice:
    """Make ``index`` the current CUDA device for a launch, only if it is not already."""

    __slots__ = ("index", "prev")

    def __init__(self, index: int):
        self.index = index
        self.prev = None

    def __enter__(self):
        import torch

        cur = torch.cuda.current_device()
        if cur != self.index:
            self.prev = cur
            torch.cuda.set_device(self.index)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            import torch

            torch.cuda.set_device(self.prev)
        return False


def _launch(fn, grid, block, args, index: int) -> None:
    with _OnDevice(index):
        fn(grid, block, args, 0, _RawStream(_stream_ptr(index)))


def _grid(n: int, vectors_per_block: int, index: int) -> int:
    # Grid-stride kernels: enough blocks to fill the device a few times over, never more than needed.
    return max(1, min(math.ceil(n / vectors_per_block), 16 * _sm_count(index)))


@functools.cache
def _cu_launch():
    lib = ctypes.CDLL("libcuda.so.1")
    f = lib.cuLaunchKernel
    f.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    f.restype = ctypes.c_int
    return f
