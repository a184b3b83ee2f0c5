"""Differences between the transformers versions nexusquant supports (5.2 to 5.24)."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["cache_kwarg", "with_cache", "output_cache"]


def cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes a cache: ``cache`` (transformers ≥ 5.20 renamed it)
    or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass to ``model(...)`` or ``model.generate(...)``."""
    return {cache_kwarg(model): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a forward or generate returned (``cache`` or, before 5.20, ``past_key_values``)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)
