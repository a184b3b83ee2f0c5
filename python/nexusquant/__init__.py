"""nexusquant: compress a transformers model's KV cache after prefill.

    from nexusquant import nexusquant_evict
    with nexusquant_evict(model, quality="balanced"):
        out = model.generate(input_ids, max_new_tokens=512)

The byte-level core (E8 codes, Hadamard rotation, delta and entropy coding, the .nqkv format) is
Rust (`nexusquant._core`); the transformers integration, presets and evaluation are Python.
"""

from ._core import NexusQuantError, e8_nearest, __version__
from .codec import E8Codec, E8Encoded

__all__ = [
    "NexusQuantError",
    "E8Codec",
    "E8Encoded",
    "e8_nearest",
    "__version__",
]
