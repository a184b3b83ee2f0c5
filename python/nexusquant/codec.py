"""The E8 quantizer, accepting numpy arrays and CPU torch tensors of any float dtype and layout."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from ._core import E8Encoded, NexusQuantError

__all__ = ["E8Codec", "E8Encoded", "as_codec_input"]

_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def as_codec_input(x: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous numpy view of `x` and the dtype name the Rust core expects.

    float32 stays float32; float16 and bfloat16 travel as their uint16 bit patterns (numpy has no
    bfloat16), so no element is converted in Python. Anything else raises NexusQuantError.
    """
    if type(x).__module__.startswith("torch"):
        name = _TORCH_DTYPES.get(str(x.dtype))
        if name is None:
            raise NexusQuantError(f"unsupported tensor dtype {x.dtype}: use float32, float16 or bfloat16")
        if x.device.type != "cpu":
            raise NexusQuantError(f"E8Codec works on CPU tensors; got one on {x.device}")
        x = x.detach().contiguous()
        if name == "float32":
            return x.numpy(), name
        import torch

        return x.view(torch.int16).numpy().view(np.uint16), name
    if not isinstance(x, np.ndarray):
        raise NexusQuantError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")
    if x.dtype == np.float32:
        return np.ascontiguousarray(x), "float32"
    if x.dtype == np.float16:
        return np.ascontiguousarray(x).view(np.uint16), "float16"
    raise NexusQuantError(f"unsupported array dtype {x.dtype}: use float32, float16 or bfloat16 (torch)")


def e8_nearest(x: Any) -> np.ndarray:
    """Nearest E8 lattice points of ``x``: float32 ``(..., 8)`` (numpy, or a CPU torch tensor),
    contiguous or not, to a new float32 array of the same shape (Conway–Sloane, exact).

    Raises NexusQuantError for another dtype, a wrong shape, an empty array, NaN or infinity.
    """
    if type(x).__module__.startswith("torch"):
        if str(x.dtype) != "torch.float32" or x.device.type != "cpu":
            raise NexusQuantError(f"e8_nearest expects a float32 CPU tensor, got {x.dtype} on {x.device}")
        x = x.detach().contiguous().numpy()
    if not isinstance(x, np.ndarray):
        raise NexusQuantError(f"e8_nearest expects a float32 numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise NexusQuantError(f"e8_nearest expects float32, got dtype {x.dtype}")
    return _core.e8_nearest(np.ascontiguousarray(x))


class E8Codec(_core.E8Codec):
    """Randomized Hadamard rotation + per-vector fp16 scale + E8 lattice codes.

    Parameters
    ----------
    head_dim : int
        Length of the vectors (any positive value; not a multiple of 8 is zero-padded).
    bits : int
        1, 2, 3 or 4 bits per dimension for the codes; the fp16 scale adds ``16 / head_dim``.
    seed : int
        Seed of the rotation's random signs.

    ``encode(x)`` takes an array or CPU tensor of shape ``(..., head_dim)`` (float32, float16 or
    bfloat16, contiguous or not) and returns an :class:`E8Encoded`; ``decode(enc)`` returns a float32
    numpy array of the same shape.
    """

    def __new__(cls, head_dim: Any, bits: Any = 2, seed: Any = 0, *args: Any, **kwargs: Any) -> E8Codec:
        # The Rust constructor takes the seed as a u64: outside that range PyO3 raises
        # OverflowError (or TypeError for a non-integer), which callers would not expect from a
        # library whose every bad argument is a NexusQuantError.
        for name, value in (("head_dim", head_dim), ("bits", bits), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise NexusQuantError(f"{name} must be an integer, got {type(value).__name__}")
        for name, value in (("head_dim", head_dim), ("bits", bits)):
            if not -(2**63) <= int(value) < 2**63:
                raise NexusQuantError(f"{name} is out of range: {value}")
        if not 0 <= int(seed) < 2**64:
            raise NexusQuantError(f"seed must be in [0, 2**64), got {seed}")
        return super().__new__(cls, int(head_dim), int(bits), int(seed), *args, **kwargs)  # type: ignore[return-value]

    # A codec is immutable (a rotation and codebooks made from its arguments), so a copy may share
    # it and a pickle only needs the arguments: this is what lets copy.deepcopy(cache) and
    # pickle.dumps(cache) work.
    def __reduce__(self) -> tuple:
        return (type(self), (self.head_dim, self.bits, self.seed, self.scale_factor, self.residual_ratio))

    def __deepcopy__(self, memo: dict) -> E8Codec:
        return self

    def __copy__(self) -> E8Codec:
        return self

    def encode(self, x: Any) -> E8Encoded:
        arr, dtype = as_codec_input(x)
        return self.encode_to(arr, dtype)

    def decode(self, enc: E8Encoded) -> np.ndarray:
        if not isinstance(enc, E8Encoded):
            raise NexusQuantError(f"decode expects an E8Encoded, got {type(enc).__name__}")
        return self.decode_from(enc)
