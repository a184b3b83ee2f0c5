"""Undo and redo a model's rotary position embedding, with the model's own code and angles.

For ``key_domain="pre_rope"`` keys are quantized before the rotary embedding. Undoing and redoing
it reuses (a) the exact ``(cos, sin)`` the model's rotary module produced for each token, captured
when the token went through attention, and (b) the model's own ``apply_rotary_pos_emb`` from its
modeling file, called with ``-sin`` to rotate back. So every ``rope_type`` the model supports
(default, linear, dynamic, llama3, yarn, longrope) and every layout (split-half, GPT-J interleaved,
partial rotary) is right by construction: nothing here recomputes an angle.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from typing import Any, Callable, Optional

import torch

from ._core import NexusQuantError

__all__ = ["RopeAdapter", "RopeTable", "RopeRecorder", "next_forward_id"]

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
            them: the rotary width, or half of it for GPT-J).
        """
        b, h, t, d = k.shape
        if inverse:
            sin = -sin
        kf = k.reshape(b * h, 1, t, d)
        c = cos.reshape(b * h, t, cos.shape[-1]).to(k.dtype)
        s = sin.reshape(b * h, t, sin.shape[-1]).to(k.dtype)
        if self.kind == "qk":
            _, out = self.fn(kf, kf, c, s)
            return out.reshape(b, h, t, d)
        x = kf.transpose(1, 2)  # (B*H, T, 1, D): GPT-J rotates before moving heads forward
        r = self.rotary_dim or d
        rot = self.fn(x[..., :r], s, c)
        out = torch.cat([rot, x[..., r:]], dim=-1) if r < d else rot
        return out.transpose(1, 2).reshape(b, h, t, d)


def _repeats_half(x: torch.Tensor) -> bool:
    """Whether the last dimension of ``x`` is its first half twice."""
    r = x.shape[-1]
    return r % 2 == 0 and r > 0 and torch.equal(x[..., : r // 2], x[..., r // 2 :])


def _first_half(x: torch.Tensor) -> torch.Tensor:
    return x[..., : x.shape[-1] // 2].contiguous()


class RopeTable:
    """The (cos, sin) the model used for every token so far, per batch row: ``(B, N, R)`` each.

    One table per distinct rotary module (Gemma-3's local and global layers differ); all layers
    that receive the same tensors in a forward share one table, so it is stored once.

    Most models' tables repeat their first half (``cat(angles, angles)``: the split-half layout):
    then only that half is held (``half``) and :meth:`gather` repeats it, which is exact and halves
    the bytes (on SmolLM2 256 bytes a token, 4-7% of a pre-RoPE cache). A table whose halves differ
    is held whole.

    A model split over several GPUs (accelerate's ``device_map``) hands each layer its own copy of
    the angles on that layer's device. The table is kept on the device that recorded it first; a
    layer on another device gathers from a copy on its own device (``mirror``), extended with only
    the rows added since, so no per-step transfer of the whole table and no cross-device gather.
    """

    def __init__(self) -> None:
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None
        self.half = False  # cos/sin hold the first half of each row; the second repeats it
        self._last: tuple = ()
        self._mirrors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        return 0 if self.cos is None else self.cos.shape[1]

    def record(self, cos: torch.Tensor, sin: torch.Tensor, start: int, forward: Optional[int] = None) -> None:
        """Store the angles of tokens ``start .. start + T`` (``cos``/``sin``: ``(B or 1, T, R)``).

        ``forward`` identifies the model forward (``nexusquant_evict`` counts them): the other
        layers of the same forward are skipped, also when they got a copy of the angles on another
        device (a split model). Without it, the tensor's identity stands in.
        """
        tag = (forward if forward is not None else id(cos), start)
        if tag == self._last:
            return  # another layer of the same forward: already stored
        self._last = tag
        if self.cos is not None and cos.device != self.cos.device:
            cos, sin = cos.to(self.cos.device), sin.to(self.cos.device)
        cos, sin = cos.detach(), sin.detach()
        repeats = _repeats_half(cos) and _repeats_half(sin)
        if self.cos is None or start == 0:
            self.half = repeats
            self.cos, self.sin = (_first_half(cos), _first_half(sin)) if repeats else (cos, sin)
            self._mirrors.clear()
            return
        assert self.sin is not None  # recorded with cos
        if start != self.length:
            if start < self.length:  # a re-run over positions already stored (e.g. a retried forward)
                self.cos, self.sin = self.cos[:, :start], self.sin[:, :start]
                self._mirrors.clear()
            else:
                raise NexusQuantError("rotary angles were not recorded for every token (a forward skipped a layer?)")
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

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=-1) if self.half else x

    def mirror(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` on ``device``: the table itself, or its copy there brought up to date."""
        assert self.cos is not None and self.sin is not None
        if device == self.cos.device:
            return self.cos, self.sin
        m = self._mirrors.get(device)
        n = self.length
        if m is None or m[0].shape[0] != self.cos.shape[0] or m[0].shape[1] > n:
            m = (self.cos.to(device), self.sin.to(device))
        elif m[0].shape[1] < n:
            have = m[0].shape[1]
            m = (
                torch.cat([m[0], self.cos[:, have:].to(device)], dim=1),
                torch.cat([m[1], self.sin[:, have:].to(device)], dim=1),
            )
        self._mirrors[device] = m
        return m

    def gather(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles at sequence indices ``seq`` ``(B, H, T)`` → ``(B, H, T, R)`` each, on ``seq``'s device."""
        cos, sin = self.mirror(seq.device)
        b, h, t = seq.shape
        idx = seq.long().reshape(b, h * t)
        cos = cos.expand(b, -1, -1)
        sin = sin.expand(b, -1, -1)
        r = cos.shape[-1]
        gi = idx[..., None].expand(b, h * t, r)
        c = torch.gather(cos, 1, gi).reshape(b, h, t, r)
        s = torch.gather(sin, 1, gi).reshape(b, h, t, r)
        return self._whole(c), self._whole(s)

    def nbytes(self) -> int:
        """Bytes of the table and of its copies on other devices."""
        held = [self.cos, self.sin] + [x for m in self._mirrors.values() for x in m]
        return sum(x.numel() * x.element_size() for x in held if x is not None)

    def map_batch(self, fn) -> None:
        if self.cos is not None:
            self.cos, self.sin = fn(self.cos), fn(self.sin)
        self._mirrors.clear()


class RopeRecorder:
    """Records each forward's rotary angles into a cache's tables, from the ``position_embeddings``
    an attention module is called with: what pre-RoPE keys (``key_domain="pre_rope"``) need to undo
    and redo the rotation. ``nexusquant_evict`` runs one from its attention hooks; a
    :class:`~nexusquant.cache.NexusQuantCache` made with the model installs its own."""

    def __init__(self, plan: list[Optional[int]]):
        self.plan = plan  # per layer, its sliding window: one table per rotary embedding (local/global)
        self._adapters: dict[int, RopeAdapter] = {}

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
        tables[key].record(cos, sin, layer.seen, forward)
        layer.rope_tables = tables
        layer.attach_rope(adapter, key)
