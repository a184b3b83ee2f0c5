"""``nexusquant_evict``: the one line users add.

    with nexusquant_evict(model, quality="balanced") as nq:
        out = model.generate(input_ids, max_new_tokens=512)
    print(nq.stats())

Inside the block, the model's configs point their attention at ``"nexusquant"`` and each attention
module has a forward pre-hook (on the instance, nothing patched on a class) that swaps the layer of
whatever cache the call carries (the ``DynamicCache`` that ``generate`` makes, or one of the user's)
for a :class:`~nexusquant.cache.NexusQuantLayer`, and records the rotary angles when keys are
quantized before RoPE. On exit, hooks and attention implementations are put back exactly as they
were, also when the block raises.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ._core import NexusQuantError
from .architecture import SUPPORTED_MODEL_TYPES, attention_modules, check_supported, layer_plan, model_fingerprint
from .attention import register as register_attention
from .cache import ATTN_IMPLEMENTATION, NexusQuantLayer, compression_stats, find_cache, is_hybrid
from .chunking import check_chunk_size, check_recode, forward_in_chunks, wants_chunks
from .compat import cache_kwarg
from .presets import CompressionSettings, resolve_settings
from .rope import RopeRecorder, RopeTable, next_forward_id

__all__ = ["nexusquant_evict", "EvictSession", "attention_modules", "SUPPORTED_MODEL_TYPES"]

_lock = threading.Lock()
_ABSENT = object()


def _configs(model: torch.nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen[id(cfg)] = cfg
    return list(seen.values())


class EvictSession:
    """State of one ``nexusquant_evict`` block: settings, the model's layer plan, the caches seen."""

    def __init__(
        self,
        model: torch.nn.Module,
        settings: CompressionSettings,
        chunk_size: Optional[int] = None,
        recode_prompt: bool = True,
    ):
        self.model = model
        self.settings = settings
        self.chunk_size = chunk_size
        self.recode_prompt = recode_prompt
        self.plan = layer_plan(model.config)
        self.fingerprint = model_fingerprint(model.config)
        self._rope = RopeRecorder(self.plan, model)
        # A strong reference: the DynamicCache that generate makes is freed when generate returns,
        # and stats() is asked for after that (the README's first example). A compressed cache is
        # small; the session holds the last one only, until the session itself goes.
        self._last_cache: Optional[Cache] = None
        self._pending_ids: Optional[torch.Tensor] = None
        # Names the current forward (layer 0's attention starts each one; unique across sessions),
        # so that a rotary table records the angles once per forward even when a split model hands
        # each layer its own copy of them.
        self._forward = 0

    def model_pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Note the token ids of a forward, so the cache can record which tokens it holds."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending_ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        self._ids_known = self._pending_ids is not None or kwargs.get("inputs_embeds") is None

    # The hook runs before every attention call; it is cheap when the layer is already ours.
    def pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = find_cache(args, kwargs)
        if cache is None:
            return
        idx = module.layer_idx
        assert isinstance(idx, int)  # attention_modules picks modules with one
        layers = cache.layers
        while len(layers) <= idx:
            if getattr(cache, "layer_class_to_replicate", None) is None:
                raise NexusQuantError(f"the cache has {len(layers)} layers but layer {idx} needs one")
            layers.append(self._new_layer(cache, len(layers)))
        layer = layers[idx]
        if not isinstance(layer, NexusQuantLayer):
            layer = self._adopt(cache, idx, layer)
            layers[idx] = layer
        if getattr(cache, "fingerprint", None) is None:
            cache.fingerprint = self.fingerprint  # type: ignore[attr-defined]
        if idx == 0:
            self._forward = next_forward_id()
            self._record_ids(cache, layer)
        self._last_cache = cache
        # A NexusQuantCache made with the model records its own angles (its settings, not the
        # session's, decide whether it needs them); recording twice would store them twice.
        if self.settings.key_domain == "pre_rope" and not getattr(cache, "records_own_rope", False):
            self._rope.record(module, kwargs, _rope_tables(cache), layer, self._forward)

    def chunking_forward(self, forward: Any) -> Any:
        """``forward`` (the model's own, bound) wrapped so that a prompt longer than ``chunk_size``
        that fills a cache runs one chunk at a time (:mod:`nexusquant.chunking`)."""
        signature = inspect.signature(forward)
        cache_name = cache_kwarg(self.model)
        chunk_size = self.chunk_size

        def note_ids(ids: Optional[torch.Tensor]) -> None:
            # Each chunk is one forward of the cache: its ids are the ones the cache records.
            self._pending_ids = ids

        # The wrapper shows the forward's own signature: generate reads it to decide what to pass
        # (attention_mask, position_ids, logits_to_keep).
        @functools.wraps(forward)
        def chunked(*args: Any, **kwargs: Any) -> Any:
            if args:
                kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
                kwargs.update(kwargs.pop("kwargs", {}))
            if not wants_chunks(kwargs, chunk_size):
                return forward(**kwargs)
            assert chunk_size is not None  # wants_chunks says so
            if kwargs.get(cache_name) is None:
                kwargs[cache_name] = DynamicCache(config=getattr(self.model, "config", None))
            return forward_in_chunks(
                forward, kwargs, chunk_size, cache_name, before_chunk=note_ids, recode=self.recode_prompt
            )

        return chunked

    def _record_ids(self, cache: Cache, layer: NexusQuantLayer) -> None:
        ids, self._pending_ids = self._pending_ids, None
        known = getattr(cache, "token_ids", None)
        if layer.seen == 0:
            cache.token_ids = ids  # type: ignore[attr-defined]
        elif ids is None or known is None or known.shape[-1] != layer.seen:
            cache.token_ids = None  # type: ignore[attr-defined]  # a gap: ids no longer known
        else:
            cache.token_ids = torch.cat([known, ids.to(known.device)], dim=-1)  # type: ignore[attr-defined]

    def _new_layer(self, cache: Cache, idx: int) -> NexusQuantLayer:
        layer = NexusQuantLayer(
            self.settings,
            self.plan[idx],
            rope_tables=_rope_tables(cache),
            in_hybrid_model=is_hybrid(self.plan),
        )
        layer.layer_idx = idx
        return layer

    def _adopt(self, cache: Cache, idx: int, old: Any) -> NexusQuantLayer:
        """Replace a transformers layer, keeping any tokens it already holds (uncompressed, in the window)."""
        new = self._new_layer(cache, idx)
        if isinstance(old, (DynamicLayer, DynamicSlidingWindowLayer)) and getattr(old, "is_initialized", False):
            k, v = old.keys, old.values
            if k is not None and k.numel() > 0:
                assert v is not None  # initialized with keys
                new.adopt_uncompressed(k, v, old.get_seq_length())
        elif not isinstance(old, (DynamicLayer, DynamicSlidingWindowLayer)):
            raise NexusQuantError(f"cannot compress a cache layer of type {type(old).__name__}; use a DynamicCache")
        return new

    @property
    def cache(self) -> Optional[Cache]:
        """The most recent cache the model used inside the block (held until the session goes)."""
        return self._last_cache

    def stats(self) -> dict[str, Any]:
        """``compression_stats`` of the most recent cache (tokens per tier, bytes, real ratio)."""
        cache = self.cache
        if cache is None:
            raise NexusQuantError("no cache has gone through the model inside this nexusquant_evict block yet")
        return compression_stats(cache)


def _rope_tables(cache: Cache) -> dict[int, RopeTable]:
    tables = getattr(cache, "rope_tables", None)
    if tables is None:
        tables = {}
        cache.rope_tables = tables  # type: ignore[attr-defined]
    return tables


@contextmanager
def nexusquant_evict(
    model: torch.nn.Module,
    quality: Union[str, CompressionSettings] = "balanced",
    chunk_size: Optional[int] = None,
    recode_prompt: bool = True,
    **knobs: Any,
) -> Iterator[EvictSession]:
    """Compress the KV cache of every forward/generate of ``model`` inside the block.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM of a supported family (Llama, Mistral, Qwen2/3, Phi-3, Gemma-2/3, GPT-NeoX, GPT-J).
    quality : str or CompressionSettings
        ``"high"``, ``"balanced"`` or ``"max"``; their measured ratios and quality are in the README.
    chunk_size : int or None
        Prefill prompts longer than this many tokens one chunk at a time, each chunk compressed
        before the next (:mod:`nexusquant.chunking` says what that changes); None: one forward.
    recode_prompt : bool
        With ``chunk_size``: transform-coded layers hold the chunks at the staging rates and code
        the whole prompt at the settings' rates once it is read (:func:`nexusquant.prefill`); False:
        each chunk at the settings' rates in the first chunk's basis (less memory while prefilling).
    **knobs
        Any :class:`~nexusquant.presets.CompressionSettings` field overrides the preset.

    Yields
    ------
    EvictSession
        ``.stats()`` gives the compression statistics of the last cache used.
    """
    settings = resolve_settings(quality, **knobs)
    chunk_size = check_chunk_size(chunk_size)
    recode_prompt = check_recode(recode_prompt)
    mods = check_supported(model)
    register_attention()  # idempotent; `import nexusquant` has usually done it already
    session = EvictSession(model, settings, chunk_size, recode_prompt)
    configs = _configs(model)
    with _lock:
        saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
        handles = []
        try:
            for cfg in configs:
                cfg._attn_implementation_internal = ATTN_IMPLEMENTATION
            for m in mods:
                # prepend: in nested blocks the innermost session decides which layers are made.
                handles.append(m.register_forward_pre_hook(session.pre_hook, with_kwargs=True, prepend=True))
            handles.append(model.register_forward_pre_hook(session.model_pre_hook, with_kwargs=True, prepend=True))
        except BaseException:
            for h in handles:
                h.remove()
            for cfg, impl in saved:
                cfg._attn_implementation_internal = impl
            raise
    # Chunking wraps the instance's forward (an instance attribute, nothing patched on the class),
    # which generate and model(...) both call; put back exactly as it was on exit.
    own_forward = model.__dict__.get("forward", _ABSENT)
    if chunk_size is not None:
        model.forward = session.chunking_forward(model.forward)
    try:
        yield session
    finally:
        if chunk_size is not None:
            if own_forward is _ABSENT:
                del model.forward
            else:
                model.forward = own_forward
        for h in handles:
            h.remove()
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
