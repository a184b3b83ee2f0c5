"""Undo and redo a model's rotary position embedding, with the model's own code and angles.

For ``key_domain="pre_rope"`` keys are quantized before the rotary embedding. Undoing and redoing
it reuses (a) the exact ``(cos, sin)`` the model's rotary module produced for each token, captured
when the token went through attention, and (b) the model's own ``apply_rotary_pos_emb`` from its
modeling file, called with ``-sin`` to rotate back. So every ``rope_type`` the model supports
(default, linear, dynamic, llama3, yarn, longrope) and every layout (split-half, GPT-J interleaved,
partial rotary) is right by construction. Where the angles are transformers' default formula with
the model's own frequencies (checked against the model's angles on every forward), a table holds
each token's position and recomputes its angles (:class:`RopeFormula`), which costs 4 bytes a
token instead of the angles' 2 x rotary width values.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ._core import NexusQuantError

__all__ = ["RopeAdapter", "RopeFormula", "RopeTable", "RopeRecorder", "next_forward_id", "rotary_sources"]

# Names model forwards (the first attention of each one draws a number; unique across sessions and
# caches), so that a rotary table records a forward's angles once even when a split model hands each
# layer its own copy of them.
_forward_ids = itertools.count(1)


def next_forward_id() -> int:
    return next(_forward_ids)


class RopeAdapter:
    """Calls a model's ``apply_rotary_pos_emb`` on keys whose tokens sit at arbitrary positions.

    Two conventions exist in transformers: ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``
    on ``(B, H, T, D)`` with ``position_embeddings = (cos, sin)``, and GPT-J's
    ``apply_rotary_pos_emb(tensor, sin, cos)`` on ``(B, T, H, rotary_dim)`` with
    ``position_embeddings = (sin, cos)`` and the rest of the head passed through.
    """

    def __init__(self, attention_module: torch.nn.Module):
        module_name = type(attention_module).__module__
        fn: Optional[Callable] = getattr(sys.modules.get(module_name), "apply_rotary_pos_emb", None)
        if fn is None:
            raise NexusQuantError(
                f"{type(attention_module).__name__} has no apply_rotary_pos_emb in {module_name}: "
                "key_domain='pre_rope' needs it; use key_domain='post_rope'"
            )
        params = list(inspect.signature(fn).parameters)
        self.fn = fn
        if params[:4] == ["q", "k", "cos", "sin"]:
            self.kind = "qk"
            self.rotary_dim = None
        elif params[:3] == ["tensor", "sin", "cos"]:
            self.kind = "gptj"
            self.rotary_dim = getattr(attention_module, "rotary_dim", None)
        else:
            raise NexusQuantError(
                f"unrecognised apply_rotary_pos_emb{tuple(params)} in {module_name}: use key_domain='post_rope'"
            )

    def split(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) from the tuple the model passes to its attention layers."""
        a, b = position_embeddings
        return (b, a) if self.kind == "gptj" else (a, b)

    def rotate(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Apply (or undo, ``inverse=True``) the rotary embedding.

        Parameters
        ----------
        k : torch.Tensor
            Keys ``(B, H, T, D)``.
        cos, sin : torch.Tensor
            The model's angles for each key, ``(B, H, T, R)`` (R as the model's rotary module made
            them: the rotary width, or half of it for GPT-J), or ``(B, 1, T, R)`` where every head
            holds the same tokens.
        """
        b, h, t, d = k.shape
        if inverse:
            sin = -sin
        if cos.shape[1] == 1 and h > 1:
            # One set of angles for all heads: the model's function broadcasts it over the heads
            # as it does in the model (angles (B, T, R) against keys (B, H, T, D)).
            kf, c, s = k, cos[:, 0], sin[:, 0]
        else:
            # Angles per head: every head its own sequence, one head each.
            kf = k.reshape(b * h, 1, t, d)
            c, s = cos.reshape(b * h, t, cos.shape[-1]), sin.reshape(b * h, t, sin.shape[-1])
        c, s = c.to(k.dtype), s.to(k.dtype)
        if self.kind == "qk":
            _, out = self.fn(kf[:, :1], kf, c, s)  # the query slot takes one head: not used
            return out.reshape(b, h, t, d)
        x = kf.transpose(1, 2)  # (B or B*H, T, H or 1, D): GPT-J rotates before moving heads forward
        r = self.rotary_dim or d
        rot = self.fn(x[..., :r], s, c)
        out = torch.cat([rot, x[..., r:]], dim=-1) if r < d else rot
        return out.transpose(1, 2).reshape(b, h, t, d).contiguous()


def _repeats_half(x: torch.Tensor) -> bool:
    """Whether the last dimension of ``x`` is its first half twice."""
    r = x.shape[-1]
    return r % 2 == 0 and r > 0 and torch.equal(x[..., : r // 2], x[..., r // 2 :])


def _first_half(x: torch.Tensor) -> torch.Tensor:
    return x[..., : x.shape[-1] // 2].contiguous()


@dataclass(frozen=True)
class RopeFormula:
    """transformers' default rotary formula, with one rotary module's numbers: the angle of
    frequency ``i`` at position ``p`` is ``p * inv_freq[i]`` (float32), a row is those angles twice
    (the split-half layout), and cos/sin are multiplied by ``scaling`` and cast to ``dtype``.

    Where it reproduces the angles the model passed to attention (checked on every forward it
    stands for, :meth:`matches`), a table holds each token's position instead of its angles: 4
    bytes a token instead of ``2 * R`` values (256 bytes on SmolLM2, 1 KB for Gemma-3's two tables).
    """

    inv_freq: torch.Tensor  # float32 (R/2,)
    scaling: float
    dtype: torch.dtype

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``(..., R)`` for integer ``positions`` ``(...)``, as the rotary module makes them."""
        freqs = positions[..., None].to(torch.float32) * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(self.dtype), (emb.sin() * self.scaling).to(self.dtype)

    def matches(self, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor]) -> bool:
        """Whether the recorded ``cos``/``sin`` ``(B or 1, T, R)`` are this formula at ``positions``
        ``(B or 1, T)``, up to one unit of the dtype's last place: the model and this code may
        evaluate cos in different (vectorized or not) code paths, whose float32 results can differ
        in the last bit and then round to neighbouring values of a 16-bit dtype."""
        if positions is None or cos.dtype != self.dtype or cos.shape[-1] != 2 * self.inv_freq.numel():
            return False
        if positions.shape[-1] != cos.shape[-2] or positions.dim() != 2:
            return False
        c, s = self.angles(positions.to(cos.device))
        tol = torch.finfo(self.dtype).eps * max(1.0, abs(self.scaling))
        # One read of the answer: each read of a GPU tensor waits for the GPU.
        worst = torch.maximum((c.float() - cos.float()).abs().max(), (s.float() - sin.float()).abs().max())
        return bool(worst <= tol)


def rotary_sources(model: Optional[torch.nn.Module]) -> list[tuple[torch.nn.Module, str, str]]:
    """The model's rotary frequency buffers: ``(module, inv_freq buffer, attention_scaling
    attribute)`` for every buffer named ``inv_freq`` or ``<layer type>_inv_freq`` (transformers'
    rotary modules), the ``original_`` copies that dynamic scaling restores excluded."""
    if model is None:
        return []
    out = []
    for module in model.modules():
        for name, _ in module.named_buffers(recurse=False):
            if name.endswith("inv_freq") and "original" not in name:
                out.append((module, name, name[: -len("inv_freq")] + "attention_scaling"))
    return out


def _formulas(sources: list[tuple[torch.nn.Module, str, str]], dtype: torch.dtype) -> list[RopeFormula]:
    """The rotary formulas the sources give now (dynamic scaling may have replaced a buffer since)."""
    out = []
    for module, freq_name, scaling_name in sources:
        inv_freq = getattr(module, freq_name, None)
        scaling = getattr(module, scaling_name, 1.0)
        if isinstance(scaling, torch.Tensor) and scaling.numel() == 1:
            scaling = float(scaling)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.dim() == 1 and isinstance(scaling, (int, float)):
            out.append(RopeFormula(inv_freq.detach().to(torch.float32).clone(), float(scaling), dtype))
    return out


class RopeTable:
    """The (cos, sin) the model used for every token so far, per batch row: ``(B, N, R)`` each.

    One table per distinct rotary module (Gemma-3's local and global layers differ); all layers
    that receive the same tensors in a forward share one table, so it is stored once.

    Three forms, the smallest that reproduces the model's angles:

    * **positions** (``formula`` set): the angles are transformers' default rotary formula
      (:class:`RopeFormula`) at each token's position, checked against the model's own angles on
      every forward recorded; the table holds the positions ``(B, N)`` int32 and recomputes the
      angles it is asked for. A forward whose angles the formula does not give (dynamic scaling
      changed the frequencies, a layout it does not know) turns the table into rows.
    * **half rows**: most models' rows repeat their first half (``cat(angles, angles)``): only that
      half is held (``half``) and :meth:`gather` repeats it, which is exact.
    * **whole rows**: anything else.

    A model split over several GPUs (accelerate's ``device_map``) hands each layer its own copy of
    the angles on that layer's device. The table is kept on the device that recorded it first; a
    layer on another device gathers from a copy on its own device (``mirror``), extended with only
    the rows added since, so no per-step transfer of the whole table and no cross-device gather.
    """

    def __init__(self) -> None:
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None
        # cos/sin (or what ``mirror`` computes from positions) hold the first half of each row; the
        # second repeats it
        self.half = False
        self.formula: Optional[RopeFormula] = None
        self.positions: Optional[torch.Tensor] = None  # int32 (B or 1, N), with ``formula``
        self._last: tuple = ()
        self._mirrors: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def length(self) -> int:
        held = self.positions if self.formula is not None else self.cos
        return 0 if held is None else held.shape[1]

    def _held(self) -> tuple[torch.Tensor, ...]:
        if self.formula is not None:
            assert self.positions is not None  # set together
            return (self.positions,)
        assert self.cos is not None and self.sin is not None
        return (self.cos, self.sin)

    def record(
        self,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        forward: Optional[int] = None,
        positions: Optional[torch.Tensor] = None,
        formulas: Callable[[], list[RopeFormula]] = list,
    ) -> None:
        """Store the angles of tokens ``start .. start + T`` (``cos``/``sin``: ``(B or 1, T, R)``).

        ``forward`` identifies the model forward (``nexusquant_evict`` counts them): the other
        layers of the same forward are skipped, also when they got a copy of the angles on another
        device (a split model). Without it, the tensor's identity stands in. ``positions``
        ``(B or 1, T)``: the position ids the model computed the angles from, and ``formulas``
        the rotary formulas that may have made them (tried when a sequence starts): with both,
        a table can hold positions instead of angles.
        """
        tag = (forward if forward is not None else id(cos), start)
        if tag == self._last:
            return  # another layer of the same forward: already stored
        self._last = tag
        home = self._held()[0].device if self.length or self.formula is not None else None
        if home is not None and cos.device != home:
            cos, sin = cos.to(home), sin.to(home)
        cos, sin = cos.detach(), sin.detach()
        if positions is not None:
            positions = positions.detach().to(cos.device)
        if self.length == 0 or start == 0:
            self._mirrors.clear()
            self.formula = next((f for f in formulas() if f.matches(cos, sin, positions)), None)
            if self.formula is not None:
                assert positions is not None  # matches() said so
                self.positions = positions.to(torch.int32)
                self.cos = self.sin = None
                self.half = True  # the formula's rows repeat their halves: ``mirror`` gives half rows
                return
            self.positions = None
            repeats = _repeats_half(cos) and _repeats_half(sin)
            self.half = repeats
            self.cos, self.sin = (_first_half(cos), _first_half(sin)) if repeats else (cos, sin)
            return
        if start != self.length:
            if start < self.length:  # a re-run over positions already stored (e.g. a retried forward)
                self._truncate(start)
            else:
                raise NexusQuantError("rotary angles were not recorded for every token (a forward skipped a layer?)")
        if self.formula is not None:
            assert self.positions is not None  # set together
            if self.formula.matches(cos, sin, positions):
                assert positions is not None  # matches() said so
                b = max(self.positions.shape[0], positions.shape[0])
                new = positions.to(torch.int32).expand(b, -1)
                self.positions = torch.cat([self.positions.expand(b, -1), new], dim=1)
                return
            self._to_rows()
        assert self.cos is not None and self.sin is not None  # a table in rows from here on
        repeats = _repeats_half(cos) and _repeats_half(sin)
        if self.half and not repeats:
            # New angles whose halves differ: hold the whole table from now on.
            self.cos, self.sin = self._whole(self.cos), self._whole(self.sin)
            self.half = False
            self._mirrors.clear()
        if self.half:
            cos, sin = _first_half(cos), _first_half(sin)
        b = max(self.cos.shape[0], cos.shape[0])
        self.cos = torch.cat([self.cos.expand(b, -1, -1), cos.expand(b, -1, -1)], dim=1)
        self.sin = torch.cat([self.sin.expand(b, -1, -1), sin.expand(b, -1, -1)], dim=1)

    def _truncate(self, n: int) -> None:
        if self.formula is not None:
            assert self.positions is not None  # set together
            self.positions = self.positions[:, :n]
        else:
            assert self.cos is not None and self.sin is not None
            self.cos, self.sin = self.cos[:, :n], self.sin[:, :n]
        self._mirrors.clear()

    def _to_rows(self) -> None:
        """Hold the angles the positions stand for as (half) rows, from now on."""
        assert self.formula is not None and self.positions is not None
        cos, sin = self.formula.angles(self.positions)  # the formula's rows repeat their halves
        self.cos, self.sin, self.half = _first_half(cos), _first_half(sin), True
        self.formula = self.positions = None
        self._mirrors.clear()

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=-1) if self.half else x

    def _held_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """What the table holds (rows, or positions), on ``device``: the table itself, or its copy
        there brought up to date."""
        held = self._held()
        if device == held[0].device:
            return held
        m = self._mirrors.get(device)
        n = self.length
        if m is None or m[0].shape[0] != held[0].shape[0] or m[0].shape[1] > n:
            m = tuple(x.to(device) for x in held)
        elif m[0].shape[1] < n:
            have = m[0].shape[1]
            m = tuple(torch.cat([old, x[:, have:].to(device)], dim=1) for old, x in zip(m, held))
        self._mirrors[device] = m
        return m

    def mirror(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` rows on ``device`` (half rows where ``half``): the table itself, or its
        copy there brought up to date; a table of positions computes them."""
        if self.formula is not None:
            (pos,) = self._held_on(device)
            cos, sin = self.formula.angles(pos)
            return _first_half(cos), _first_half(sin)
        cos, sin = self._held_on(device)
        return cos, sin

    def gather(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles at sequence indices ``seq`` ``(B, H, T)`` → ``(B, H, T, R)`` each, on ``seq``'s device."""
        b, h, t = seq.shape
        idx = seq.long().reshape(b, h * t)
        if self.formula is not None:
            (pos,) = self._held_on(seq.device)
            p = torch.gather(pos.expand(b, -1), 1, idx).reshape(b, h, t)
            return self.formula.angles(p)
        cos, sin = self._held_on(seq.device)
        cos = cos.expand(b, -1, -1)
        sin = sin.expand(b, -1, -1)
        r = cos.shape[-1]
        gi = idx[..., None].expand(b, h * t, r)
        c = torch.gather(cos, 1, gi).reshape(b, h, t, r)
        s = torch.gather(sin, 1, gi).reshape(b, h, t, r)
        return self._whole(c), self._whole(s)

    def nbytes(self) -> int:
        """Bytes of the table (its formula's frequencies included) and of its copies on other devices."""
        if self.length == 0:
            return 0
        held = list(self._held()) + [x for m in self._mirrors.values() for x in m]
        if self.formula is not None:
            held.append(self.formula.inv_freq)
        return sum(x.numel() * x.element_size() for x in held)

    def map_batch(self, fn) -> None:
        if self.formula is not None and self.positions is not None:
            self.positions = fn(self.positions)
        elif self.cos is not None:
            self.cos, self.sin = fn(self.cos), fn(self.sin)
        self._mirrors.clear()


class RopeRecorder:
    """Records each forward's rotary angles into a cache's tables, from the ``position_embeddings``
    an attention module is called with: what pre-RoPE keys (``key_domain="pre_rope"``) need to undo
    and redo the rotation. ``nexusquant_evict`` runs one from its attention hooks; a
    :class:`~nexusquant.cache.NexusQuantCache` made with the model installs its own."""

    def __init__(self, plan: list[Optional[int]], model: Optional[torch.nn.Module] = None):
        self.plan = plan  # per layer, its sliding window: one table per rotary embedding (local/global)
        self._adapters: dict[int, RopeAdapter] = {}
        # The model's rotary frequencies: a table whose angles they reproduce holds positions only.
        self._sources = rotary_sources(model)

    def record(
        self, module: torch.nn.Module, kwargs: dict[str, Any], tables: dict[int, RopeTable], layer: Any, forward: int
    ) -> None:
        """Store the angles of the tokens ``module`` is about to process for the cache layer
        ``layer`` (a :class:`~nexusquant.cache.NexusQuantLayer`), whose cache holds ``tables``."""
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise NexusQuantError(
                f"{type(module).__name__} got no position_embeddings: key_domain='pre_rope' needs them"
            )
        adapter = self._adapters.get(id(module))
        if adapter is None:
            adapter = self._adapters[id(module)] = RopeAdapter(module)
        idx = module.layer_idx
        assert isinstance(idx, int)  # attention modules are found by their layer_idx
        key = 1 if self.plan[idx] is not None else 0
        if key not in tables:
            tables[key] = RopeTable()
        cos, sin = adapter.split(pe)
        positions = kwargs.get("position_ids")
        if not isinstance(positions, torch.Tensor) or adapter.kind != "qk":
            positions = None  # GPT-J's interleaved layout is not the formula's: rows
        tables[key].record(cos, sin, layer.seen, forward, positions, lambda: _formulas(self._sources, cos.dtype))
        layer.rope_tables = tables
        layer.attach_rope(adapter, key)
