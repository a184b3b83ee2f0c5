"""The CUDA path: kernels in ``cuda/nexusquant.cu``, compiled with CuPy's RawModule (NVRTC).

torch CUDA tensors go in and out without copies, on torch's current stream of the tensor's device.
``available(device)`` says whether this path can run; everything else falls back to the torch/CPU
path when it cannot. The package, one job per module, each importing only those above it:

- :mod:`.build`: the kernel source, one compiled module per option set and device (cached), the
  availability probe;
- :mod:`.device_tables`: codebook tables and rotations on each device;
- :mod:`.launch`: current device and stream, the two ways kernels are launched;
- :mod:`.codec`: E8 ``encode`` and ``decode``, bit-identical to the Rust codec;
- :mod:`.attention`: ``decode_attention`` (one launch per decode step), its tiers
  (:class:`CodedTier`) and the kernel's parameter struct, written once as a field list;
- :mod:`.reference`: the same attention in plain torch, for tests and CPU tensors;
- :mod:`.transform`: transform-coded keys rebuilt on the GPU (an unpacking kernel and one GEMM);
- :mod:`.pca_attention`: decode attention over transform-coded keys in one launch (keys rebuilt on
  chip), the rebuild path's replacement where it applies.
"""

from __future__ import annotations

import os

from .attention import CodedTier, decode_attention, fused_supported
from .build import available, kernel_source_path
from .codec import decode, encode
from .device_tables import dense_inverse_rotation
from .pca_attention import pca_decode_attention
from .reference import decode_attention_partials_reference, decode_attention_reference, rotate_queries
from .transform import place_keys, transform_keys, transform_keys_supported

__all__ = [
    "available",
    "encode",
    "decode",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_partials_reference",
    "fused_supported",
    "kernel_source_path",
    "rotate_queries",
    "dense_inverse_rotation",
    "CodedTier",
    "transform_keys",
    "place_keys",
    "transform_keys_supported",
    "pca_decode_attention",
    "PCA_FUSED_DISABLED",
]

# True: decode over transform-coded keys takes the rebuild path (tests and benchmarks compare;
# NEXUSQUANT_PCA_FUSED=0 in the environment sets it).
PCA_FUSED_DISABLED = os.environ.get("NEXUSQUANT_PCA_FUSED") == "0"
