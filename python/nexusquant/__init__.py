"""nexusquant: compress a transformers model's KV cache after prefill.

    from nexusquant import nexusquant_evict
    with nexusquant_evict(model, quality="balanced"):
        out = model.generate(input_ids, max_new_tokens=512)

The byte-level core (E8 codes, Hadamard rotation, delta and entropy coding, the .nqkv format) is
Rust (`nexusquant._core`); the transformers integration, presets and evaluation are Python. The
torch-dependent parts load on first use, so `import nexusquant` works without torch.

`import nexusquant` is enough for ``model.set_attn_implementation("nexusquant")``: see
:func:`register_attention`.
"""

import importlib
import importlib.abc
import sys

from ._core import CorruptFileError, NexusQuantError, UnsupportedVersionError, __version__
from .codec import E8Codec, E8Encoded, e8_nearest

__all__ = [
    "NexusQuantError",
    "CorruptFileError",
    "UnsupportedVersionError",
    "E8Codec",
    "E8Encoded",
    "e8_nearest",
    "__version__",
    "nexusquant_evict",
    "NexusQuantCache",
    "CompressionSettings",
    "PRESETS",
    "E8_PRESETS",
    "compression_stats",
    "save_cache",
    "load_cache",
    "inspect_file",
    "prefill",
    "register_attention",
]

_LAZY = {
    "nexusquant_evict": ("evict", "nexusquant_evict"),
    "NexusQuantCache": ("cache", "NexusQuantCache"),
    "compression_stats": ("cache", "compression_stats"),
    "CompressionSettings": ("presets", "CompressionSettings"),
    "PRESETS": ("presets", "PRESETS"),
    "E8_PRESETS": ("presets", "E8_PRESETS"),
    "save_cache": ("files", "save_cache"),
    "load_cache": ("files", "load_cache"),
    "inspect_file": ("files", "inspect_file"),
    "prefill": ("chunking", "prefill"),
}


def register_attention() -> None:
    """Make ``"nexusquant"`` a valid ``attn_implementation`` in transformers' registries.

    Idempotent; it imports ``nexusquant.attention`` (torch and transformers) and calls its
    ``register``. ``import nexusquant`` must stay cheap and work without torch (the CLI's ``--help``, the codec),
    yet a user who imports nexusquant and then calls ``model.set_attn_implementation("nexusquant")``
    must find it registered: so if transformers' modeling code is already imported this registers
    now, and otherwise :class:`_RegisterAfterTransformers` does it right after transformers'
    modeling code has been imported (which any model, hence any ``set_attn_implementation``, needs).
    """
    importlib.import_module(".attention", __name__).register()


# The modules nexusquant.attention imports from transformers (modeling_utils holds the registry
# set_attn_implementation checks). Registration waits until none of them is half-imported.
_TRANSFORMERS_MODULES = ("transformers.modeling_utils", "transformers.masking_utils", "transformers.cache_utils")
# nexusquant.attention itself imports those modules: when it is the one importing them, it is
# half-imported when they finish, so registration waits for it to finish too.
_WATCHED = (*_TRANSFORMERS_MODULES, "nexusquant.attention")


def _half_imported(name: str) -> bool:
    mod = sys.modules.get(name)
    return mod is not None and getattr(getattr(mod, "__spec__", None), "_initializing", False)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """An import hook that calls :func:`register_attention` once transformers' modeling code has
    been imported. It only wraps the loader of the modules in ``_TRANSFORMERS_MODULES`` and removes
    itself when registration is done."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def done(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader, hook: _RegisterAfterTransformers):
        self._loader = loader
        self._hook = hook

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        name = module.__name__
        if "transformers.modeling_utils" not in sys.modules and name != "transformers.modeling_utils":
            return  # nothing can ask for the attention before the registry exists
        if any(_half_imported(n) for n in _WATCHED if n != name):
            return  # the one being imported will call back when it is done
        self._hook.done()
        register_attention()


def _install_registration() -> None:
    if "transformers.modeling_utils" in sys.modules and not any(map(_half_imported, _WATCHED)):
        register_attention()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


_install_registration()


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        if mod in ("cache", "files"):
            register_attention()
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nexusquant' has no attribute {name!r}")
