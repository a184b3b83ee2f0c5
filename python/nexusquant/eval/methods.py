"""The methods an evaluation compares: what each one is, how to make its cache, how to count its bytes.

A :class:`Method` opens a :class:`MethodRun` on a model (a context manager: nexusquant and the
eviction peers attach to the model for the duration); the run makes a fresh cache per sequence,
and :func:`~nexusquant.eval.peers.held_nbytes` counts what that cache holds.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from transformers import DynamicCache

from .._core import NexusQuantError
from ..chunking import check_chunk_size, check_recode
from ..evict import nexusquant_evict
from ..presets import E8_PRESETS, PRESETS, resolve_settings
from . import peers
from .names import ALL_METHODS, DEFAULT_METHODS, FAMILIES

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code
    from transformers import PreTrainedModel

__all__ = [
    "Method",
    "MethodRun",
    "FAMILIES",
    "DEFAULT_METHODS",
    "ALL_METHODS",
    "expand_methods",
    "parse_variant",
    "backend_available",
    "evict_for_ratio",
]

_BACKEND_MODULES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}


def backend_available(backend: str) -> Optional[str]:
    """None when a QuantizedCache backend can be used here, else why not."""
    module, package = _BACKEND_MODULES[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return f"{backend}: the package {package!r} is not installed (pip install {package})"
    return None


@dataclass(frozen=True)
class Method:
    """One row of the results.

    ``family`` is the line it belongs to in the plot (a key of :data:`FAMILIES`); ``preset`` is the
    nexusquant preset it runs (nexusquant families) or whose real ratio it is matched to (eviction
    peers); ``bits`` the bit width of quantized caches.
    """

    name: str
    family: str
    preset: Optional[str] = None
    bits: Optional[int] = None
    knobs: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def kind(self) -> str:
        return FAMILIES[self.family][1]

    @property
    def label(self) -> str:
        return FAMILIES[self.family][0]

    @property
    def chunk_size(self) -> Optional[int]:
        """Prefill chunk size (``chunk_size`` knob: a session option, not a cache setting)."""
        return self.knobs.get("chunk_size")

    @property
    def recode_prompt(self) -> bool:
        """Whether a chunked prefill codes the prompt again at its end (``recode_prompt`` knob, a
        session option; True unless set)."""
        return bool(self.knobs.get("recode_prompt", True))

    def settings(self, evict: Optional[float] = None) -> dict[str, Any]:
        """The nexusquant cache settings this method runs with (nexusquant and eviction kinds)."""
        if self.kind == "nexusquant":
            assert self.preset is not None
            return resolve_settings(self.preset, **_cache_knobs(self.knobs)).as_dict()
        if self.kind == "evict":
            if evict is None:
                raise NexusQuantError(f"internal: {self.name} needs an eviction fraction")
            peers.register_peers()
            return resolve_settings(
                "balanced",
                evict=evict,
                demote=0.0,
                key_bits=16,
                value_bits=16,
                sink_tokens=peers.PEER_SINKS[self.family],
                recent_window=1,
                pool_kernel=1,
                center=False,
                key_domain="post_rope",
                scorer=self.family,
            ).as_dict()
        return {}

    @contextlib.contextmanager
    def open(self, model: PreTrainedModel, evict: Optional[float] = None) -> Iterator[MethodRun]:
        """Attach to ``model`` for the block; yields a :class:`MethodRun`."""
        kind = self.kind
        if kind in ("nexusquant", "evict"):
            if self.family == "expected-attention":
                peers.attach_rotary(model)
            settings = self.settings(evict)
            with nexusquant_evict(model, chunk_size=self.chunk_size, recode_prompt=self.recode_prompt, **settings):
                shown = dict(settings)
                if self.chunk_size is not None:
                    shown.update(chunk_size=self.chunk_size, recode_prompt=self.recode_prompt)
                yield MethodRun(self, model, lambda: DynamicCache(config=model.config), shown)
        elif kind == "baseline":
            yield MethodRun(self, model, lambda: DynamicCache(config=model.config), {})
        elif kind == "quantized-cache":
            from transformers import QuantizedCache

            why = backend_available(self.family)
            if why is not None:
                raise NexusQuantError(why)
            # transformers' defaults: groups of 64 along head_dim, a 128-token full-precision residual.
            desc = {
                "backend": self.family,
                "nbits": self.bits,
                "q_group_size": 64,
                "residual_length": 128,
                "axis_key": 0,
                "axis_value": 0,
            }
            yield MethodRun(self, model, lambda: QuantizedCache(self.family, model.config, nbits=self.bits), desc)
        elif kind == "int":
            assert self.bits is not None
            bits = self.bits
            yield MethodRun(
                self,
                model,
                lambda: peers.PerTokenIntCache(model.config, bits),
                {"bits": bits, "per": "token", "scale": "fp16 scale and minimum per vector"},
            )
        else:
            raise NexusQuantError(f"internal: unknown method kind {kind!r}")


@dataclass
class MethodRun:
    """A method attached to a model: ``new_cache()`` for each sequence, ``settings`` as run."""

    method: Method
    model: torch.nn.Module
    _factory: Any
    settings: dict

    def new_cache(self):
        return self._factory()


def _cache_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs that are cache settings (all but the session's ``chunk_size`` and
    ``recode_prompt``)."""
    return {k: v for k, v in knobs.items() if k not in _SESSION_KNOBS}


# Knobs of the nexusquant_evict session, not of the cache's settings.
_SESSION_KNOBS = ("chunk_size", "recode_prompt")


def evict_for_ratio(prompt_tokens: int, ratio: float) -> float:
    """Eviction fraction at which a 16-bit cache of ``prompt_tokens`` holds ``1/ratio`` of the
    bytes: keep ``round(prompt_tokens / ratio)`` tokens (at least one)."""
    kept = max(1, min(prompt_tokens, round(prompt_tokens / ratio)))
    return 1.0 - kept / prompt_tokens


def _knob_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: Union[str, dict]) -> Method:
    """A nexusquant method with explicit knobs: ``"evict=0,demote=0"`` (on the balanced preset),
    ``"max:evict=0.75,key_bits=3"`` (on another preset) or a dict of knobs (``"preset"`` key optional).

    Raises NexusQuantError for an unknown preset, knob or value.
    """
    if isinstance(spec, dict):
        knobs = dict(spec)
        preset = str(knobs.pop("preset", "balanced"))
    else:
        preset, _, rest = spec.partition(":") if ":" in spec else ("balanced", "", spec)
        knobs = {}
        for item in rest.split(","):
            if not item.strip():
                continue
            name, eq, value = item.partition("=")
            if not eq:
                raise NexusQuantError(f"variant {spec!r}: expected knob=value items, got {item!r}")
            knobs[name.strip()] = _knob_value(value.strip())
    resolve_settings(preset, **_cache_knobs(knobs))  # validates
    check_chunk_size(knobs.get("chunk_size"))
    check_recode(knobs.get("recode_prompt", True))
    shown = ",".join(f"{k}={v}" for k, v in knobs.items())
    return Method(f"nq-{preset}[{shown}]", "nexusquant-variant", preset=preset, knobs=knobs)


def expand_methods(
    names: Union[list[str], tuple[str, ...]],
    presets: Union[list[str], tuple[str, ...]],
    variants: Sequence[Union[str, dict]] = (),
) -> tuple[list[Method], list[str]]:
    """Methods for the families or method names given (``"all"`` = every family), baseline first,
    then the nexusquant ``variants`` (see :func:`parse_variant`).

    Returns ``(methods, notes)``; a quantized-cache backend that cannot run here is left out with a
    note saying why. Raises NexusQuantError for an unknown name, preset or knob.
    """
    for p in presets:
        if p not in PRESETS:
            raise NexusQuantError(f"unknown preset {p!r}: use some of {sorted(PRESETS)}")
    wanted: list[str] = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        wanted.extend(ALL_METHODS if n == "all" else [n])
    out: list[Method] = [Method("uncompressed", "baseline")]
    notes: list[str] = []
    seen: set[str] = {"uncompressed"}

    def add(m: Method) -> None:
        if m.name not in seen:
            seen.add(m.name)
            out.append(m)

    for n in wanted:
        family, bits = n, None
        for fam in ("quanto", "hqq"):
            if n in (f"{fam}-int2", f"{fam}-int4"):
                family, bits = fam, int(n[-1])
        if n in ("int2", "int4"):
            family, bits = "int", int(n[-1])
        if family in ("baseline", "nexusquant-variant") or n == "uncompressed":
            continue
        if family not in FAMILIES:
            raise NexusQuantError(
                f"unknown method {n!r}: use 'all' or some of {', '.join(ALL_METHODS)} "
                "(or int2, int4, quanto-int2, quanto-int4, hqq-int2, hqq-int4)"
            )
        kind = FAMILIES[family][1]
        if family == "nexusquant":
            for p in presets:
                add(Method(f"nexusquant-{p}", family, preset=p))
        elif family == "nexusquant-e8":
            # The same preset name as the first release defined it (E8 keys after RoPE, eviction),
            # so one run shows the old codec beside the new one.
            for p in presets:
                add(Method(f"nexusquant-{p}-e8", family, preset=p, knobs=E8_PRESETS[p].as_dict()))
        elif kind == "evict":
            for p in presets:
                add(Method(f"{family}@{p}", family, preset=p))
        elif kind == "quantized-cache":
            why = backend_available(family)
            if why is not None:
                if why not in notes:
                    notes.append(why)
                continue
            for b in (bits,) if bits else (2, 4):
                add(Method(f"{family}-int{b}", family, bits=b))
        elif kind == "int":
            for b in (bits,) if bits else (2, 4):
                add(Method(f"int{b}", family, bits=b))
    for v in variants:
        add(parse_variant(v))
    return out, notes
