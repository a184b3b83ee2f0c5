"""The compressed KV cache: a transformers ``Cache`` whose layers hold E8 codes, not fp16.

Layout of one layer (shapes ``(batch, kv_heads, tokens, head_dim)``)::

    sinks (fp) | fine tier (E8 or transform codes) | coarse tier (E8) | generated tier (E8) | window (fp)

Until the first prompt-like forward ends, every token sits in the full-precision window, exactly
as in ``DynamicLayer``. When the attention of a forward with more than one query has run (the
prefill), ``nexusquant.attention`` scores the window's tokens and calls :meth:`compress`: the first
``sink_tokens`` real tokens become sinks, the last ``recent_window`` stay in the window, the rest go
to the fine tier, the coarse tier or nowhere. During generation, tokens join the window and are
compressed into the fine tier ``block`` at a time (into the generated tier where the fine tier's
keys are transform-coded: the prompt's basis does not fit them). Evicted tokens are gone; kept tokens keep their
sequence index, so masks and (for pre-RoPE keys) the rotary embedding stay exact.

``update`` returns the layer's keys and values dequantized into one scratch tensor (the fp16 of one
layer alive at a time). The mask for the compressed part comes from the layer (validity of ragged
rows, sliding windows); the model's own mask only covers the window.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import gpu
from ._core import NexusQuantError
from .allocation import allocate_tokens
from .architecture import attention_modules, layer_plan, model_fingerprint
from .chunking import held_for_next_chunk, held_while_prefilling, prompt_tokens_in_prefill, recode_prompt
from .presets import CompressionSettings, resolve_settings
from .rope import RopeAdapter, RopeRecorder, RopeTable, next_forward_id
from .scoring import key_key_importance, pool_scores
from .tiers import TIER_NAMES, Tier, TransformCodedKeys

__all__ = ["NexusQuantCache", "NexusQuantLayer", "LayerView", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "nexusquant"
# A layer's own tensors (the tiers hold theirs): what batch maps, byte counts and files go through.
LAYER_TENSOR_FIELDS = (
    "sink_k",
    "sink_v",
    "sink_seq",
    "sink_valid",
    "win_k",
    "win_v",
    "win_valid",
    "k_center",
    "v_center",
)
# Set to 1 to run the fused decode path on CPU tensors too, through its torch reference (tests of
# the merging logic where no GPU is present). Read at each decode step, so a test sets it for
# itself (monkeypatch.setenv) instead of switching a module global.
FUSED_REFERENCE_ENV = "NEXUSQUANT_FUSED_REFERENCE_ON_CPU"


# A transform-coded layer coded below `high`'s rates (chunked `high` measured within 0.1 points of
# one forward, so it is not staged) holds a chunked prefill's chunks at the staging rates while the
# prompt is read (``recode_prompt``). SmolLM2, 4096 tokens in chunks of 1024, `max` chunked against
# one-shot: staged at 3 b/elem keys and 4-bit values +1.47 points, at 5 b/elem keys +0.69, at 5 and
# full-precision values -0.31 (but 5.1x the codes `max` holds unstaged, against 2.35x); docs/EVAL.md.
STAGE_BELOW_KEY_RATE = 3.0
STAGE_BELOW_VALUE_BITS = 4
STAGING_KEY_RATE = 5.0
STAGING_VALUE_BITS = 4


@dataclass
class _StagedPrompt:
    """A staged fine tier's tokens, decoded for the prompt's final code: keys and values
    ``(B, H, T, D)``, sequence index (or None) and validity ``(B, H, T)``, attention or None."""

    k: torch.Tensor
    v: torch.Tensor
    seq: Optional[torch.Tensor]
    valid: torch.Tensor
    attention: Optional[torch.Tensor]


@dataclass
class LayerView:
    """What ``update`` handed to attention, attached to the returned key tensor as ``_nq_view``.

    ``compressed`` slots come first in the key tensor, then the window (which ends with the ``new``
    tokens of this forward).
    """

    layer: NexusQuantLayer
    compressed: int
    window: int
    new: int
    seen_before: int
    comp_seq: Optional[torch.Tensor]  # int (B, H, C) sequence index of compressed slots, if tracked
    comp_valid: Optional[torch.Tensor]  # bool (B, H, C), None if every slot is valid
    # Tiers left as codes for a fused kernel (the key tensor then holds only sinks and window);
    # empty when everything was dequantized into the key tensor.
    lazy_tiers: tuple = ()
    consumed: bool = False  # the nexusquant attention function saw it
    caught_up: bool = False  # not consumed, and the layer compressed after it (another attention)


def _cat(parts: list[Optional[torch.Tensor]], dim: int) -> Optional[torch.Tensor]:
    kept = [p for p in parts if p is not None and p.shape[dim] > 0]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else torch.cat(kept, dim=dim)


def is_hybrid(plan: list[Optional[int]]) -> bool:
    """Whether a model's layer plan (each layer's sliding window, None for global) mixes both kinds."""
    return any(w is None for w in plan) and any(w is not None for w in plan)


class NexusQuantLayer(CacheLayerMixin):
    """One attention layer's compressed cache. See the module docstring for the layout."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        settings: CompressionSettings,
        sliding_window: Optional[int] = None,
        record_positions: bool = False,
        rope_tables: Optional[dict[int, RopeTable]] = None,
        in_hybrid_model: bool = False,
    ):
        super().__init__()
        self.settings = settings
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        # A layer of a model with both sliding and global layers (sliding_key_bits, global_key_rate).
        self.in_hybrid_model = in_hybrid_model
        self.record_positions = record_positions
        self.rope_tables = rope_tables if rope_tables is not None else {}
        self.rope_adapter: Optional[RopeAdapter] = None
        self.rope_key: Optional[int] = None
        self.layer_idx: Optional[int] = None  # for messages; set by the cache that holds the layer
        # The config whose attn_implementation this layer's model reads (NexusQuantCache sets it);
        # a weak reference, so copies of the cache share it and nothing keeps the model alive.
        self.attn_config: Optional[weakref.ReferenceType] = None
        self._reset_state()

    def __getstate__(self) -> dict[str, Any]:
        # Pickling: a weak reference cannot be pickled; without it the layer still learns from the
        # previous forward whether attention runs through nexusquant.
        state = self.__dict__.copy()
        state["attn_config"] = None
        return state

    def _reset_state(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.sink_k: Optional[torch.Tensor] = None
        self.sink_v: Optional[torch.Tensor] = None
        self.sink_seq: Optional[torch.Tensor] = None
        self.sink_valid: Optional[torch.Tensor] = None
        self.win_k: Optional[torch.Tensor] = None
        self.win_v: Optional[torch.Tensor] = None
        self.win_valid: Optional[torch.Tensor] = None  # bool (B, W)
        # The tiers by name, in TIER_NAMES order (empty until the first tokens arrive): iterate this,
        # do not name tiers one by one; files and stats key their entries by these names.
        self.tiers: dict[str, Tier] = {}
        # Each KV head's mean key and value (B, H, 1, D), subtracted before quantization: a key's
        # mean part adds the same logit to every token, so only the rest needs the bits, and
        # centred keys measured 2.3x (post-RoPE) to 4.5x (pre-RoPE) less squared error at 2 bits
        # on SmolLM2's KV (a one-off measurement when centring was added; its script was not kept).
        self.k_center: Optional[torch.Tensor] = None
        self.v_center: Optional[torch.Tensor] = None
        self.first_compression_done = False
        # The prefill queries' second moment (B, F, F) until the transform coder's basis is fitted
        # for good, and how many queries (times their group size) it averages, per batch row (B,).
        self.query_moment: Optional[torch.Tensor] = None
        self.query_count: Optional[torch.Tensor] = None
        # The fine tier holds a chunked prefill's chunks at the staging rates (``recode_prompt``):
        # the whole prompt is coded again at the settings' rates once its last chunk is read.
        self.staged = False
        self.prompt_tokens = 0
        self.dropped = 0
        self.last_view: Optional[LayerView] = None
        self.keys = self.values = None

    def __repr__(self) -> str:
        return f"NexusQuantLayer(seen={self.seen}, compressed={self.compressed_slots}, window={self.window_len})"

    # ---------------------------------------------------------------- properties
    @property
    def window_len(self) -> int:
        return 0 if self.win_k is None else self.win_k.shape[2]

    @property
    def window_size(self) -> int:
        """``sliding_window`` of a sliding layer (read only where ``is_sliding`` holds)."""
        assert self.sliding_window is not None, "not a sliding layer"
        return self.sliding_window

    @property
    def fine(self) -> Optional[Tier]:
        """The tier the prompt's best-scored tokens go to, and generated blocks (but where its keys
        are transform-coded: those go to the "generated" tier)."""
        return self.tiers.get("fine")

    @property
    def coarse(self) -> Optional[Tier]:
        """The tier demoted prompt tokens go to (fewer bits)."""
        return self.tiers.get("coarse")

    def holding_tiers(self) -> tuple[Tier, ...]:
        """The tiers that hold tokens, in TIER_NAMES order."""
        return tuple(t for t in self.tiers.values() if t.length > 0)

    @property
    def compressed_slots(self) -> int:
        n = 0 if self.sink_k is None else self.sink_k.shape[2]
        return n + sum(t.length for t in self.tiers.values())

    @property
    def needs_positions(self) -> bool:
        return self.is_sliding or self.settings.key_domain == "pre_rope" or self.record_positions

    # ---------------------------------------------------------------- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype = key_states.dtype
        self.device = key_states.device
        self.batch = key_states.shape[0]
        self.heads = key_states.shape[1]
        self.head_dim = key_states.shape[3]
        s = self.settings
        # A sliding layer holds fewer than sliding_window tokens at a time and its first
        # compression sees only the last of them: a basis fitted on so few keys codes the tokens that
        # follow badly (measured on a tiny Mistral: 0.77 max logit error at 8 bits per element,
        # against 0.15 for 4-bit E8 codes), so sliding layers keep the per-vector E8 code.
        key_bits = s.key_bits
        key_rate = s.key_rate if (s.key_codec == "pca" and s.key_bits != 16 and not self.is_sliding) else None
        if self.in_hybrid_model:
            # The few global layers are the only ones that read the whole prompt (presets.py).
            if self.is_sliding and s.sliding_key_bits is not None:
                key_bits = s.sliding_key_bits
            if key_rate is not None and s.global_key_rate is not None:
                key_rate = s.global_key_rate
        self.fine_rates = (key_bits, key_rate, s.value_bits)
        self.tiers = {
            "fine": self._fine_tier(key_rate, s.value_bits, refine=True),
            "coarse": Tier(self.head_dim, s.coarse_key_bits, s.coarse_value_bits, s.seed, self.dtype),
            "generated": Tier(
                self.head_dim,
                key_bits,
                s.value_bits if s.generated_value_bits is None else s.generated_value_bits,
                s.seed,
                self.dtype,
            ),
        }
        assert tuple(self.tiers) == TIER_NAMES
        self.is_initialized = True

    def _fine_tier(self, key_rate: Optional[float], value_bits: int, refine: bool) -> Tier:
        """An empty fine tier with these rates (its key bits are the layer's, ``fine_rates``)."""
        s = self.settings
        return Tier(
            self.head_dim,
            self.fine_rates[0],
            value_bits,
            s.seed,
            self.dtype,
            key_rate=key_rate,
            # Refinement follows the prompt's attention; a sliding layer's tokens leave its
            # window (and its tiers are sliced), so it does not refine.
            value_refine_bits=s.value_refine_bits if refine and s.value_refine_share > 0 and not self.is_sliding else 0,
        )

    def adopt_uncompressed(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Take over the tokens another cache layer holds, ``(B, H, n, D)``, uncompressed in the
        window: the last ``n`` of the ``seen`` tokens that layer has seen (fewer for a sliding
        layer). They are compressed with the next compression, as prompt tokens are."""
        if self.is_initialized and self.seen:
            raise NexusQuantError("internal: a layer can adopt tokens only while it holds none")
        if seen < keys.shape[2]:
            raise NexusQuantError(f"internal: {keys.shape[2]} tokens adopted, but only {seen} seen")
        self.lazy_initialization(keys, values)
        self.win_k, self.win_v = keys, values
        self.win_valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
        self.seen = seen

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append the new tokens ``(B, H, q, D)`` to the window and return all keys and values.

        The returned key tensor carries a :class:`LayerView` (``_nq_view``) for the attention
        function; the compressed part is dequantized here, one layer at a time.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        seen_before = self.seen
        if self.is_sliding and self.window_len > 0:
            # Window tokens no query of this forward can see (seq <= seen - window) are dropped, as
            # transformers' sliding layer does; the model's mask is sliced from its end, so the
            # window may shrink here.
            # Window tokens have seq in [seen - W, seen - 1]; the first query (seq = seen) sees
            # seq > seen - sliding_window, so all but the last sliding_window - 1 are dead.
            dead = max(0, self.window_len - (self.window_size - 1))
            if dead > 0:
                assert self.win_k is not None and self.win_v is not None and self.win_valid is not None
                self.win_k = self.win_k[:, :, dead:]
                self.win_v = self.win_v[:, :, dead:]
                self.win_valid = self.win_valid[:, dead:]
        w_before = self.window_len
        self.win_k = key_states if self.win_k is None else torch.cat([self.win_k, key_states], dim=2)
        self.win_v = value_states if self.win_v is None else torch.cat([self.win_v, value_states], dim=2)
        new_valid = torch.ones(self.batch, q, dtype=torch.bool, device=self.device)
        self.win_valid = new_valid if self.win_valid is None else torch.cat([self.win_valid, new_valid], dim=1)
        self.seen += q

        if q == 1 and self._attention_is_nexusquant() and self._fused_decode_possible():
            keys, values, view = self._lazy_view(q, w_before, seen_before)
            keys._nq_view = view
            self.last_view = view
            return keys, values
        comp_k, comp_v, comp_seq, comp_valid = self._compressed_parts()
        if comp_k is None:
            keys, values, c = self.win_k, self.win_v, 0
        else:
            keys = torch.cat([comp_k, self.win_k], dim=2)
            values = torch.cat([comp_v, self.win_v], dim=2)
            c = comp_k.shape[2]
        view = LayerView(self, c, w_before + q, q, seen_before, comp_seq, comp_valid)
        if keys is self.win_k:
            keys = keys.view_as(keys)  # a distinct tensor object to carry the view
        keys._nq_view = view  # type: ignore[attr-defined]
        self.last_view = view
        return keys, values

    def _attention_is_nexusquant(self) -> bool:
        """Whether this forward's attention runs through the nexusquant function, which alone can
        read a lazy view (codes left out of the key tensor): the model's config says so where the
        layer knows it, and the previous forward's view was consumed by it."""
        config = self.attn_config() if self.attn_config is not None else None
        if config is not None and getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            return False
        return self.last_view is None or self.last_view.consumed

    def catch_up(self) -> None:
        """Compress what the previous forward left when its attention did not run through nexusquant.

        The nexusquant attention function compresses a layer right after its attention, scoring
        tokens with the forward's real queries. Under any other attention implementation (SDPA,
        eager, ...) nothing does, so :class:`NexusQuantCache` calls this before the next forward's
        masks are sized. What differs: prompt tokens are scored with the key-key scorer whatever
        ``scorer`` says (there are no queries here); padding is not known, so a left-padded batch
        gets its padding compressed like real tokens and, with eviction, masked by position only;
        the forward that fills the window attends to it in full precision, as it would anyway.
        With ``evict=0`` the result equals the nexusquant attention's up to quantization.
        """
        view = self.last_view
        if view is None or view.consumed or view.caught_up:
            return
        view.caught_up = True
        s = self.settings
        if view.new > 1 and self.wants_prompt_compression():
            hold = held_while_prefilling()
            if self.is_sliding or (s.evict == 0.0 and s.demote == 0.0):
                self.compress(None, hold)
            else:
                assert self.win_k is not None and self.win_valid is not None
                scores = key_key_importance(self.win_k, s.score_window, self.win_valid)
                self.compress(pool_scores(scores, s.pool_kernel), hold)
        elif self.wants_block_compression():
            self.compress(None, generated=True)

    def _fused_decode_possible(self) -> bool:
        """Whether decode attention can read this layer's codes directly (CUDA kernel, post-RoPE keys),
        or, for transform-coded keys on CUDA, rebuild them tier by tier (:meth:`decode_tier`)."""
        if self.is_sliding:
            return False
        tiers = self.holding_tiers()
        if any(isinstance(t.keys, TransformCodedKeys) for t in tiers):
            return self.device.type == "cuda" and gpu.transform_keys_supported(self.device)
        if self.settings.key_domain != "post_rope":
            return False
        if not tiers or any(t.keys.codec is None or t.values.codec is None for t in tiers):
            return False
        if any(t.values.ref_idx is not None for t in tiers):
            return False  # the fused kernel reads one E8 code per value: refined values are dequantized
        if self.device.type == "cuda":
            codec = tiers[0].keys.codec
            assert codec is not None  # checked above
            return gpu.available(self.device) and gpu.fused_supported(codec.padded_dim, 8)
        return os.environ.get(FUSED_REFERENCE_ENV) == "1"

    def _lazy_view(self, q: int, w_before: int, seen_before: int):
        """Keys/values of the full-precision slots only (sinks, then window); tiers stay as codes."""
        assert self.win_k is not None and self.win_v is not None
        tiers = self.holding_tiers()
        if self.sink_k is not None and self.sink_k.shape[2] > 0:
            assert self.sink_v is not None
            keys = torch.cat([self.sink_k, self.win_k], dim=2)
            values = torch.cat([self.sink_v, self.win_v], dim=2)
            c = self.sink_k.shape[2]
        else:
            keys, values, c = self.win_k.view_as(self.win_k), self.win_v, 0
        view = LayerView(
            self,
            c,
            w_before + q,
            q,
            seen_before,
            self.sink_seq if c else None,
            self.sink_valid if c else None,
            lazy_tiers=tiers,
        )
        return keys, values, view

    def materialize(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize a lazy view's tiers: all keys and values, as a non-lazy ``update`` returns them."""
        comp_k, comp_v, comp_seq, comp_valid = self._compressed_parts()
        assert comp_k is not None and self.win_k is not None and self.win_v is not None
        view.compressed = comp_k.shape[2]
        view.comp_seq, view.comp_valid, view.lazy_tiers = comp_seq, comp_valid, ()
        return torch.cat([comp_k, self.win_k], dim=2), torch.cat([comp_v, self.win_v], dim=2)

    def decode_tier(self, tier: Tier) -> tuple[torch.Tensor, torch.Tensor]:
        """A tier's keys and values as one-query decode attention reads them on CUDA: float32
        ``(B, H, T, D)``, centres added, RoPE redone for pre-RoPE keys.

        Transform-coded keys are rebuilt by :func:`nexusquant.gpu.transform_keys` (unpacking kernel
        and one fp16 GEMM per batch row) and placed and rotated by :func:`nexusquant.gpu.place_keys`;
        no key tensor in the model's dtype and no concatenation with the window is made. Any
        other tier (the E8 "generated" tier of such a layer: its generated blocks, small next to
        the prompt) is dequantized as :meth:`materialize` does, RoPE redone in torch.
        """
        v = tier.values.dequantize().float()
        if self.v_center is not None:
            v = v + self.v_center.float()
        pre_rope = self.settings.key_domain == "pre_rope" and tier.keys.bits != 16
        rope = self._kernel_rope() if pre_rope else None
        keys = tier.keys
        if not isinstance(keys, TransformCodedKeys) or (pre_rope and rope is None):
            k = keys.dequantize(self.k_center) if isinstance(keys, TransformCodedKeys) else keys.dequantize()
            if self.k_center is not None and not isinstance(keys, TransformCodedKeys):
                k = k + self.k_center
            if pre_rope:
                assert tier.seq is not None  # pre-RoPE layers track positions
                k = self._redo_rope(k, tier.seq)
            return k.float(), v
        keys.join_appends()
        b, h, t, d = v.shape
        out = torch.empty(b, h, t, d, dtype=torch.float32, device=v.device)
        center = None if self.k_center is None else self.k_center.reshape(b, h * d)
        for i, row in enumerate(keys.rows):
            exact = self.dtype == torch.float32
            flat = gpu.transform_keys(row[0], None if center is None else center[i], exact)  # (T, H * D)
            if rope is None:
                gpu.place_keys(flat, h, out[i])
            else:
                assert tier.seq is not None  # pre-RoPE layers track positions
                cos, sin, rot = rope
                r = min(i, cos.shape[0] - 1)  # a table of one row serves every batch row
                seq = tier.seq[i, 0].to(torch.int32).contiguous()  # every head holds the same tokens
                gpu.place_keys(flat, h, out[i], (cos[r], sin[r], rot), seq)
        return out, v

    def _kernel_rope(self) -> Optional[tuple[torch.Tensor, torch.Tensor, int]]:
        """The rotary table as :func:`nexusquant.gpu.place_keys` reads it, float32 ``(B or 1,
        positions, width)`` and the rotated width; None where the model's rotation is not the
        split-half one the kernel computes (checked once per model, on random angles)."""
        if self.rope_adapter is None or self.rope_key not in self.rope_tables:
            self._rope_angles(torch.zeros(1, 1, 0, dtype=torch.int32))  # raises the error that says why
        assert self.rope_key is not None and self.rope_adapter is not None
        table = self.rope_tables[self.rope_key]
        # A table of positions computes its (half) rows here, for every position it holds.
        cos, sin = table.mirror(self.device)
        width = cos.shape[-1]
        rot = 2 * width if table.half else width
        if not _split_half_rotation(self.rope_adapter, self.head_dim, width, table.half):
            return None
        return cos.float().contiguous(), sin.float().contiguous(), rot

    def _compressed_parts(self):
        """Sinks and both tiers, dequantized: keys, values ``(B, H, C, D)``, sequence index and
        validity ``(B, H, C)`` (None where not tracked / all valid)."""
        b, h = self.batch, self.heads
        ks, vs, seqs, valids = [], [], [], []
        if self.sink_k is not None and self.sink_k.shape[2] > 0:
            ks.append(self.sink_k)
            vs.append(self.sink_v)
            seqs.append(self.sink_seq)
            valids.append(self.sink_valid)
        for tier in self.holding_tiers():
            if isinstance(tier.keys, TransformCodedKeys):
                # The centre rides in the rebuild's bias on the GPU (one pass less over the keys).
                k = tier.keys.dequantize(self.k_center)
            else:
                k = tier.keys.dequantize()
                if self.k_center is not None:
                    k = k + self.k_center
            v = tier.values.dequantize()
            if self.v_center is not None:
                v = v + self.v_center
            if self.settings.key_domain == "pre_rope" and tier.keys.bits != 16:
                k = self._redo_rope(k, tier.seq)
            ks.append(k)
            vs.append(v)
            seqs.append(tier.seq)
            valids.append(tier.valid)
        if not ks:
            return None, None, None, None
        seq = torch.cat([x.to(torch.int32) for x in seqs], dim=2) if self.needs_positions else None
        valid = None
        if any(v is not None for v in valids):
            valid = torch.cat(
                [
                    v if v is not None else torch.ones(b, h, kk.shape[2], dtype=torch.bool, device=kk.device)
                    for v, kk in zip(valids, ks)
                ],
                dim=2,
            )
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), seq, valid

    def get_mask_sizes(self, query_length: Union[int, torch.Tensor], *args: Any) -> tuple[int, int]:
        """(kv_length, kv_offset) such that the last window + query columns of the model's mask sit at
        the window tokens' real sequence indices (the compressed columns are masked by nexusquant)."""
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        c = self.compressed_slots
        w = self.window_len
        return c + w + q, self.seen - w - c

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the same, under its name before transformers 5.5
        return -1

    def reset(self) -> None:
        self._reset_state()

    def crop(self, tokens_to_remove: int) -> None:
        raise NexusQuantError(
            "a compressed cache cannot be cropped (assisted decoding and contrastive search need crop); "
            "generate without them, or without nexusquant"
        )

    def offload(self) -> None:
        raise NexusQuantError("offloading a nexusquant cache is not supported: it is already compressed")

    def prefetch(self) -> None:
        return None

    def _map_batch(self, fn) -> None:
        for name in LAYER_TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        for tier in self.tiers.values():
            tier.map_batch(fn)
        if self.win_k is not None:
            self.batch = self.win_k.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # ---------------------------------------------------------------- rotary embedding
    def attach_rope(self, adapter: RopeAdapter, table_key: int) -> None:
        self.rope_adapter = adapter
        self.rope_key = table_key

    def _rope_angles(self, seq: torch.Tensor):
        if self.rope_adapter is None or self.rope_key not in self.rope_tables:
            raise NexusQuantError(
                "key_domain='pre_rope' needs the rotary angles of every token: use nexusquant_evict(model) or "
                "make the cache with the model, NexusQuantCache(model, ...), which record them, or "
                "key_domain='post_rope'"
            )
        if seq.shape[1] > 1 and (self.heads_share_tokens() or bool(torch.equal(seq, seq[:, :1].expand_as(seq)))):
            # The same tokens in every head (transform-coded tiers; nothing evicted per head): one
            # set of angles, broadcast by the rotation. Per head they were 1.8 GB of float32
            # temporaries at a 128K-token prefix's re-rotation (docs/GPU.md).
            seq = seq[:, :1]
        return self.rope_tables[self.rope_key].gather(seq)

    def heads_share_tokens(self) -> bool:
        """Whether every tier holds the same tokens in every KV head, known without looking: a
        layer with transform-coded fine keys codes all heads of a token together, so it keeps or
        drops a token in every head at once (``allocate_tokens``), generated blocks included; a
        layer that neither evicts nor demotes keeps every token in every head. (Comparing the
        heads' positions on a GPU waits for it: 84 of a prefill's 548 waits.)"""
        fine = self.fine
        if fine is not None and isinstance(fine.keys, TransformCodedKeys):
            return True
        return self.settings.evict == 0.0 and self.settings.demote == 0.0

    def _undo_rope(self, k: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        cos, sin = self._rope_angles(seq)
        assert self.rope_adapter is not None
        return self.rope_adapter.rotate(k, cos, sin, inverse=True)

    def _redo_rope(self, k: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        cos, sin = self._rope_angles(seq)
        assert self.rope_adapter is not None
        return self.rope_adapter.rotate(k, cos, sin)

    # ---------------------------------------------------------------- compression
    def mark_new_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the newest tokens are padding (``new_valid``: bool ``(B, q)``)."""
        q = new_valid.shape[1]
        assert self.win_valid is not None
        self.win_valid[:, -q:] = new_valid.to(self.win_valid.device)

    def window_seq(self) -> torch.Tensor:
        """Sequence index of each window token, ``(W,)``."""
        return torch.arange(self.seen - self.window_len, self.seen, device=self.device)

    def wants_prompt_compression(self) -> bool:
        return self.window_len > self.settings.recent_window

    def wants_attention(self) -> bool:
        """Whether the next prompt compression uses the attention the prompt's last queries pay
        each token (:meth:`compress`'s ``attention``): to weigh the transform coder's fit or to
        choose the values to refine (the fine tier's, or once a staged prompt is coded again)."""
        fine = self.fine
        return self.weights_key_fit() or (
            fine is not None
            and (
                fine.values.refine_codec is not None
                or (self.staged and self.settings.value_refine_share > 0 and held_for_next_chunk() == 0)
            )
        )

    def weights_key_fit(self) -> bool:
        """Whether the next compression fits a transform coder's basis weighted by attention
        (``key_attention_share``), which the nexusquant attention then measures even when nothing
        is evicted."""
        fine = self.fine
        return (
            self.settings.key_attention_share > 0.0
            and self.fits_key_basis()
            and fine is not None
            and (fine.length == 0 or held_for_next_chunk() == 0)  # a staged prompt: its last chunk
        )

    def fits_key_basis(self) -> bool:
        """Whether the fine tier's transform coder has its basis still to fit: nothing coded yet,
        or a chunked prefill's chunks held at the staging rates until the prompt is coded again."""
        fine = self.fine
        return fine is not None and isinstance(fine.keys, TransformCodedKeys) and (fine.length == 0 or self.staged)

    def wants_block_compression(self) -> bool:
        threshold = self.settings.recent_window + self.settings.block
        if self.is_sliding:
            # A sliding layer never holds more than sliding_window - 1 tokens: compress before that.
            threshold = min(threshold, max(self.settings.recent_window + 1, self.window_size - 1))
        return self.window_len >= threshold

    def observe_queries(self, query: torch.Tensor) -> None:
        """Keep the second moment of a prompt's queries ``(B, H_q, q, D)`` (the forward that ends
        the prefill) as the transform coder's metric: a key error ``e`` moves a logit by ``q·e``.

        Per batch row, a ``(F, F)`` matrix, ``F = kv_heads * head_dim``, block diagonal over KV
        heads (each block sums the query heads of that group), in the keys' domain (RoPE undone
        for pre-RoPE keys). Padding queries are left out. A layer whose chunks are staged
        (``recode_prompt``) averages every prompt query; otherwise the latest forward's queries
        before the basis is fitted are kept. Once it is fitted, forwards are ignored.
        """
        if not self.fits_key_basis():
            return
        b, hq, q, d = query.shape
        h = self.heads
        g = hq // h
        x = query.detach()  # a statistic for the coder, not part of the model's graph
        if self.settings.key_domain == "pre_rope":
            seq = (self.seen - q + torch.arange(q, device=query.device, dtype=torch.int32)).expand(b, hq, q)
            x = self._undo_rope(x, seq)
        x = x.float()
        if self.win_valid is not None:
            x = x * self.win_valid[:, None, -q:, None].to(x.dtype)
            count = self.win_valid[:, -q:].sum(1).clamp(min=1).to(x.dtype) * g  # (B,)
        else:
            count = torch.full((b,), float(q * g), device=x.device)
        moment = torch.zeros(b, h * d, h * d, device=x.device)
        for j in range(h):
            xq = x[:, j * g : (j + 1) * g].reshape(b, g * q, d)
            moment[:, j * d : (j + 1) * d, j * d : (j + 1) * d] = xq.transpose(1, 2) @ xq / count[:, None, None]
        if self.staged and self.query_moment is not None and self.query_count is not None:
            # A staged chunk: the prompt's final code takes the mean over every query of the
            # prompt, as one forward sees them. A layer fitting its basis on the first chunk takes
            # the newest chunk's queries instead (the second's: measured better on lcet10 at 4096,
            # -0.57% against +2.53% with the mean of both).
            seen = self.query_count
            total = seen + count
            moment = (self.query_moment * seen[:, None, None] + moment * count[:, None, None]) / total[:, None, None]
            count = total
        self.query_moment, self.query_count = moment, count

    def compress(
        self,
        scores: Optional[torch.Tensor],
        keep_exact: int = 0,
        generated: bool = False,
        attention: Optional[torch.Tensor] = None,
    ) -> None:
        """Compress the window's tokens except the last ``max(recent_window, keep_exact)``.

        Parameters
        ----------
        scores : torch.Tensor or None
            float ``(B, H, W)`` importance of every window token (None: a generation block, which
            is kept whole in the fine tier).
        keep_exact : int
            Newest tokens to keep in full precision even beyond the recent window (a chunked
            prefill keeps the chunk just seen for the next chunk, ``nexusquant.chunking``).
        generated : bool
            The tokens are a generated block: with transform-coded fine keys they go to the
            "generated" tier (E8 codes) once the fine tier's basis is fitted.
        attention : torch.Tensor or None
            float ``(B, H, C + W)``: attention the prompt's last queries pay each token of the
            forward's keys (the compressed part as the layer's update returned it, then the window),
            which weighs the tokens in the transform coder's fit (``key_attention_share``) and picks
            the values to refine (``value_refine_share``). Only the window's part is read, and the
            fine tier's part when a staged prompt is coded again.

        A chunked prefill with ``recode_prompt`` (``nexusquant.chunking``) codes the chunks of a
        transform-coded layer coded below `high`'s rates at the staging rates (at least
        ``STAGING_KEY_RATE`` bits per key element and ``STAGING_VALUE_BITS``-bit values) while the
        prompt is read, so that later chunks build on a fine code of the prefix; the compression that ends the prompt
        (``keep_exact`` 0) decodes them and codes the whole prompt at the settings' rates, with a
        basis fitted on all of it, as one forward over the prompt would.
        """
        s = self.settings
        w = self.window_len
        if self.is_sliding:
            # Its window is sized for the model's mask (at most sliding_window - 1 tokens before a
            # forward's own): a sliding layer keeps nothing back.
            keep_exact = 0
        window_attention = None if attention is None else attention[..., attention.shape[-1] - w :]
        finishing = self.staged and keep_exact == 0
        if finishing:
            generated = False  # a prompt's last tokens, whichever path compresses them
        r = min(max(s.recent_window, keep_exact), w)
        n = w - r
        # Budgets are fractions of the tokens this compression decides on; the recent window
        # counts towards the kept share, tokens held back for the next chunk do not (their turn
        # comes with the next compression).
        segment = w - (r - min(s.recent_window, w))
        if n <= 0:
            return
        assert self.win_k is not None and self.win_v is not None and self.win_valid is not None
        b, h = self.batch, self.heads
        cand_k, cand_v = self.win_k[:, :, :n], self.win_v[:, :, :n]
        cand_valid = self.win_valid[:, :n]  # (B, n)
        cand_seq = self.window_seq()[:n]  # (n,)
        rest_valid = self.win_valid[:, n:]
        self._check_finite(cand_k, cand_v, cand_valid, cand_seq)
        evicting = scores is not None and not self.is_sliding

        if not self.first_compression_done and s.sink_tokens > 0:
            # Sinks: the first real tokens of each row, kept in full precision.
            rank = torch.cumsum(cand_valid.int(), dim=1)  # 1-based rank among real tokens
            is_sink = cand_valid & (rank <= s.sink_tokens)
            n_sink = int(is_sink.sum(1).max().item()) if is_sink.any() else 0
            if n_sink > 0:
                idx, valid = _select_rows(is_sink, n_sink)  # (B, S)
                self.sink_k = _gather_tokens(cand_k, idx[:, None, :].expand(b, h, -1))
                self.sink_v = _gather_tokens(cand_v, idx[:, None, :].expand(b, h, -1))
                self.sink_seq = cand_seq[idx][:, None, :].expand(b, h, -1).to(torch.int32)
                self.sink_valid = None if bool(valid.all()) else valid[:, None, :].expand(b, h, -1).contiguous()
                if not self.needs_positions:
                    self.sink_seq = None
            cand_valid = cand_valid & ~is_sink
        self.first_compression_done = True

        if self.is_sliding:
            # Tokens older than the window are never attended again.
            cand_valid = cand_valid & (cand_seq[None, :] > self.seen - self.window_size)

        if evicting:
            assert scores is not None
            if scores.shape[-1] != w:
                raise NexusQuantError(f"internal: scores cover {scores.shape[-1]} tokens, the window holds {w}")
        # Budgets are fractions of this prompt segment's real tokens; sinks and the recent window
        # are full precision and count towards the fine share (win_valid still counts the sinks).
        # Transform-coded fine keys code all heads of a token together: the same tokens in every head.
        to_fine, to_coarse = allocate_tokens(
            scores[:, :, :n] if evicting and scores is not None else None,
            cand_valid,
            self.win_valid[:, :segment].sum(1),
            s.evict,
            s.demote,
            self.heads_share_tokens(),
            h,
        )

        assert tuple(self.tiers) == TIER_NAMES
        chosen_by_tier = (to_fine, to_coarse, torch.zeros_like(to_fine))
        fine = self.tiers["fine"]
        if generated and isinstance(fine.keys, TransformCodedKeys) and fine.length > 0:
            chosen_by_tier = (chosen_by_tier[2], to_coarse, to_fine)
        # What the host needs of this decision, read back in one go (every read of a GPU tensor
        # waits for the GPU; read one at a time they were 8 waits of a chunk's compression): each
        # tier's most and fewest tokens over rows and heads (its slots; all slots real when equal),
        # the tokens dropped, and the prompt's real tokens where eviction budgets count them.
        per_head = torch.stack([chosen.sum(-1).flatten() for chosen in chosen_by_tier])  # (3, B * H)
        dropped = (cand_valid[:, None, :].expand(b, h, n) & ~to_fine & ~to_coarse).sum()
        real = cand_valid.sum() if scores is not None else torch.zeros_like(dropped)
        read = torch.cat([per_head.amax(1), per_head.amin(1), dropped.view(1), real.view(1)]).tolist()
        most, fewest = read[0:3], read[3:6]
        self.dropped += int(read[6])
        self.prompt_tokens += int(read[7])
        staged = None
        if finishing:
            staged = self._unstage(None if attention is None else attention[..., : attention.shape[-1] - w])
        elif keep_exact > 0 and not generated and recode_prompt() and fine.length == 0:
            self._stage()
        for i, (tier, chosen) in enumerate(zip(self.tiers.values(), chosen_by_tier)):
            count, all_real = int(most[i]), fewest[i] == most[i]
            joined = staged if tier is self.fine else None
            if count == 0 and joined is None:
                continue
            if count > 0:
                idx, valid = _select_heads(chosen, count)  # (B, H, count), ascending sequence order
            else:
                idx = torch.zeros(b, h, 0, dtype=torch.long, device=cand_k.device)
                valid = torch.zeros(b, h, 0, dtype=torch.bool, device=cand_k.device)
            k = _gather_tokens(cand_k, idx)
            v = _gather_tokens(cand_v, idx)
            seq = cand_seq[idx]
            if s.key_domain == "pre_rope" and tier.keys.bits != 16:
                k = self._undo_rope(k, seq)
            if s.center and self.k_center is None:
                w8 = valid[..., None].to(k.dtype)
                cnt = w8.sum(2, keepdim=True).clamp(min=1)
                self.k_center = (k * w8).sum(2, keepdim=True) / cnt
                self.v_center = (v * w8).sum(2, keepdim=True) / cnt
            if self.k_center is not None:
                assert self.v_center is not None  # set together
                k = k - self.k_center
                v = v - self.v_center
            read_by, amortize = window_attention, prompt_tokens_in_prefill()
            if joined is not None:
                # The staged prompt first, then the newest tokens: one code of the whole prompt.
                k = torch.cat([joined.k.to(k.dtype), k], dim=2)
                v = torch.cat([joined.v.to(v.dtype), v], dim=2)
                seq = torch.cat([joined.seq.to(seq.dtype), seq], dim=2) if joined.seq is not None else seq
                if read_by is not None and joined.attention is not None:
                    t = joined.k.shape[2]
                    read_by = torch.cat([joined.attention.to(read_by.dtype), read_by], dim=-1)
                    idx = torch.cat([torch.arange(t, device=idx.device).expand(b, h, t), idx + t], dim=2)
                else:
                    read_by = None
                valid = torch.cat([joined.valid, valid], dim=2)
                all_real = bool(valid.all())
                # The decoded prompt is in the joined copies now: not held while they are coded
                # (0.5 GB of a layer's peak at 128K tokens and 8 KV heads, docs/GPU.md).
                staged = joined = None
                amortize = 0  # every token the basis codes is here, as in one forward
                if self.k_center is not None and all(t.length == 0 for t in self.tiers.values() if t is not tier):
                    k, v = self._recentre(k, v, valid)
            tier.append(
                k,
                v,
                seq if self.needs_positions else None,
                None if all_real else valid,
                seq_bound=self.seen,  # positions count the tokens seen
                heads_share_tokens=self.heads_share_tokens(),
                key_metric=self.query_moment if tier is self.fine else None,
                amortize_tokens=amortize,
                key_token_weight=self._key_fit_weight(read_by, idx, valid) if tier is self.fine else None,
                **(self._value_refinement(read_by, idx, valid) if tier is self.fine else {}),
            )
            if tier is self.fine and not self.staged:
                # The basis is fitted for good: the prompt's queries are not kept.
                self.query_moment = self.query_count = None
        if keep_exact == 0:
            # Nothing more is coded chunk by chunk into this prompt's basis: its factors go.
            for tier in self.tiers.values():
                if isinstance(tier.keys, TransformCodedKeys):
                    tier.keys.release_analysis()
        # Keep the recent window.
        self.win_k = self.win_k[:, :, n:].contiguous()
        self.win_v = self.win_v[:, :, n:].contiguous()
        self.win_valid = rest_valid.contiguous()
        if self.is_sliding:
            self._prune_outside_window()

    def _recentre(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, H, T, D)`` of a whole prompt about to be coded again, centred on
        the first chunk's mean, centred on the prompt's instead (the layer's centres move with
        them), as one forward centres them. Only while no other tier holds codes made with the
        old centres. On the first chunk's centre a re-coded `max` measured 2.89 points behind one
        forward at 4096 tokens in chunks of 1024, re-centred 1.47 (same staging; docs/EVAL.md)."""
        assert self.k_center is not None and self.v_center is not None  # set together
        w8 = valid[..., None].to(k.dtype)
        cnt = w8.sum(2, keepdim=True).clamp(min=1)
        # The mean of tokens centred on the old centre is the new centre minus the old one.
        k_shift = (k * w8).sum(2, keepdim=True) / cnt
        v_shift = (v * w8).sum(2, keepdim=True) / cnt
        self.k_center = self.k_center + k_shift.to(self.k_center.dtype)
        self.v_center = self.v_center + v_shift.to(self.v_center.dtype)
        return k - k_shift, v - v_shift

    def _stage(self) -> None:
        """Make the empty fine tier of a transform-coded layer a staging tier (a chunked prefill's
        chunks, ``recode_prompt``), where the settings' rates are below `high`'s
        (``STAGE_BELOW_*``): at the staging rates, or the settings' own where finer."""
        _, key_rate, value_bits = self.fine_rates
        if key_rate is None or (key_rate >= STAGE_BELOW_KEY_RATE and value_bits >= STAGE_BELOW_VALUE_BITS):
            return
        stage_rate = max(key_rate, STAGING_KEY_RATE)
        stage_bits = value_bits if value_bits == 16 else max(value_bits, STAGING_VALUE_BITS)
        self.tiers["fine"] = self._fine_tier(stage_rate, stage_bits, refine=False)
        self.staged = True

    def _unstage(self, compressed_attention: Optional[torch.Tensor]) -> _StagedPrompt:
        """The staged fine tier's tokens decoded (keys centred and, pre-RoPE, unrotated, as they
        were coded; values centred), and an empty fine tier at the settings' rates in its place.
        ``compressed_attention`` ``(B, H, C)``: the attention over the compressed part (sinks, then
        the fine tier's tokens), or None."""
        fine = self.tiers["fine"]
        assert isinstance(fine.keys, TransformCodedKeys)
        k, v = fine.keys.dequantize(), fine.values.dequantize()
        b, h, t, _ = k.shape
        valid = fine.valid if fine.valid is not None else torch.ones(b, h, t, dtype=torch.bool, device=k.device)
        attention = None
        if compressed_attention is not None:
            first = self.sink_k.shape[2] if self.sink_k is not None else 0
            attention = compressed_attention[..., first : first + t]
        self.tiers["fine"] = self._fine_tier(self.fine_rates[1], self.fine_rates[2], refine=True)
        self.staged = False
        return _StagedPrompt(k, v, fine.seq, valid, attention)

    def _value_refinement(
        self, attention: Optional[torch.Tensor], idx: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, Any]:
        """The fine tier's value refinement for the tokens ``idx`` ``(B, H, T)`` (window positions,
        ``valid`` ``(B, H, T)``): each head's ``value_refine_share`` of them, the most attended by
        ``attention`` ``(B, H, W)``. Empty where values are not refined."""
        fine = self.fine
        if attention is None or fine is None or fine.values.refine_codec is None:
            return {}
        rank = attention.float().gather(2, idx).masked_fill(~valid, float("-inf"))
        count = int(round(self.settings.value_refine_share * int(valid.sum(2).max().item())))
        return {"value_refine": rank, "value_refine_count": count}

    def _key_fit_weight(
        self, attention: Optional[torch.Tensor], idx: torch.Tensor, valid: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Token weights ``(B, T)`` for the transform coder's fit of the tokens ``idx`` ``(B, H, T)``
        (window positions; ``valid`` ``(B, H, T)``): ``key_attention_share`` of each row's weight by
        the ``attention`` ``(B, H, W)`` the token gets (summed over KV heads: the coder codes them
        together), the rest even; mean 1 over the real tokens. None where the fit is not weighted:
        other key codecs, a basis already fitted, no attention given, or a zero share."""
        if attention is None or not self.weights_key_fit():
            return None
        share = self.settings.key_attention_share
        tokens = idx[:, 0]  # (B, T): transform-coded tiers hold the same tokens in every head
        real = valid[:, 0].to(torch.float32)
        attention = attention.float().sum(1).gather(1, tokens) * real
        count = real.sum(1, keepdim=True).clamp(min=1)
        total = attention.sum(1, keepdim=True)
        # A row whose scores are all zero (nothing attended) falls back to even weights.
        attention = torch.where(total > 0, attention / total.clamp(min=1e-30) * count, real)
        return share * attention + (1.0 - share) * real

    def _check_finite(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, seq: torch.Tensor) -> None:
        """Refuse NaN/infinite keys or values of real tokens (``k``, ``v`` ``(B, H, n, D)``, ``valid``
        ``(B, n)``, ``seq`` ``(n,)``), naming the layer, token, batch row and head: the codec would
        only say "vector i"."""
        where = "" if self.layer_idx is None else f"layer {self.layer_idx}: "
        bad_by_part = [(~torch.isfinite(x)).any(-1) & valid[:, None, :] for x in (k, v)]
        # One read of both answers: each read of a GPU tensor waits for the GPU.
        if not any(torch.stack([bad.any() for bad in bad_by_part]).tolist()):
            return
        for part, bad in zip(("key", "value"), bad_by_part):
            if bool(bad.any()):
                b, h, t = (int(i) for i in bad.nonzero()[0])
                raise NexusQuantError(
                    f"{where}the {part} of token {int(seq[t])} (batch row {b}, KV head {h}) holds NaN or "
                    "infinity: the model produced it, and it cannot be quantized"
                )

    def _prune_outside_window(self) -> None:
        """Drop compressed tokens of a sliding layer that no future query can see."""
        limit = self.seen - self.window_size  # a token stays visible while its seq > seen - window
        for tier in self.holding_tiers():
            if tier.seq is None:
                continue
            drop = int((tier.seq[0, 0].to(torch.int64) <= limit).sum().item())  # tokens are in sequence order
            if drop > 0:
                tier.slice_tokens(drop)
        if self.sink_seq is not None and self.sink_k is not None and self.sink_k.shape[2] > 0:
            if int(self.sink_seq.max().item()) <= limit:
                self.sink_k = self.sink_v = self.sink_seq = self.sink_valid = None

    # ---------------------------------------------------------------- accounting
    # The layer's own counters a ``.nqkv`` file records (META's per-layer keys, docs/FORMAT.md).
    STATE_SCALARS = ("seen", "first_compression_done", "dropped", "prompt_tokens", "rope_key")

    def state_dict(self) -> dict[str, Any]:
        """The layer's counters (``STATE_SCALARS``) and own tensors (``LAYER_TENSOR_FIELDS``, None
        where absent); the tiers have their own :meth:`Tier.state_dict`. Tensors are not copies."""
        state = {name: getattr(self, name) for name in self.STATE_SCALARS}
        state.update((name, getattr(self, name)) for name in LAYER_TENSOR_FIELDS)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the counters and tensors :meth:`state_dict` names; a name not in ``state`` is left
        as it is (a file of an uninitialized layer holds counters only)."""
        for name in (*self.STATE_SCALARS, *LAYER_TENSOR_FIELDS):
            if name in state:
                setattr(self, name, state[name])

    def nbytes(self) -> int:
        """Every byte this layer holds: codes, scales, full-precision tokens, indices, masks."""
        total = 0
        for name in LAYER_TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None:
                total += t.numel() * t.element_size()
        for tier in self.tiers.values():
            total += tier.nbytes()
        return total

    def uncompressed_nbytes(self, dtype_bytes: int = 2) -> int:
        """Bytes transformers' own cache would hold for the same tokens in fp16 (K and V)."""
        if not self.is_initialized:
            return 0
        held = min(self.seen, self.window_size - 1) if self.is_sliding else self.seen
        return 2 * self.batch * self.heads * held * self.head_dim * dtype_bytes

    def stats(self) -> dict[str, Any]:
        lengths = {name: (self.tiers[name].length if name in self.tiers else 0) for name in TIER_NAMES}
        sinks = 0 if self.sink_k is None else self.sink_k.shape[2]
        nb = self.nbytes()
        unc = self.uncompressed_nbytes()
        elements = (
            2
            * self.batch
            * self.heads
            * (sinks + sum(lengths.values()) + self.window_len)
            * getattr(self, "head_dim", 0)
        )
        return {
            "sliding": self.is_sliding,
            "tokens_seen": self.seen,
            "sinks": sinks,
            **lengths,
            "window": self.window_len,
            "dropped": self.dropped,
            "nbytes": nb,
            "fp16_nbytes": unc,
            "ratio": (unc / nb) if nb else math.nan,
            "bits_per_kept_element": (8 * nb / elements) if elements else math.nan,
        }


_SPLIT_HALF: dict[tuple, bool] = {}


def _split_half_rotation(adapter: RopeAdapter, d: int, width: int, half: bool) -> bool:
    """Whether ``adapter`` (the model's apply_rotary_pos_emb) rotates a ``d``-dim key with angle
    rows of ``width`` (a half table: repeated) as the split-half formula of ``nq_pca_place``
    does: tried once per model function and shape on random keys and angles, on the CPU."""
    key = (adapter.fn, adapter.kind, adapter.rotary_dim, d, width, half)
    hit = _SPLIT_HALF.get(key)
    if hit is not None:
        return hit
    rot = 2 * width if half else width
    ok = False
    if rot <= d and rot % 2 == 0:
        gen = torch.Generator().manual_seed(0)
        k = torch.randn(1, 1, 3, d, generator=gen)
        cos = torch.randn(1, 1, 3, width, generator=gen)
        sin = torch.randn(1, 1, 3, width, generator=gen)
        if half:
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        try:
            got = adapter.rotate(k, cos, sin)
        except Exception:  # a layout the adapter cannot even apply to these shapes
            got = None
        r = rot // 2
        want = k.clone()
        want[..., :r] = k[..., :r] * cos[..., :r] - k[..., r:rot] * sin[..., :r]
        want[..., r:rot] = k[..., r:rot] * cos[..., r:rot] + k[..., :r] * sin[..., r:rot]
        ok = got is not None and got.shape == want.shape and bool(torch.allclose(got, want, atol=1e-5))
    _SPLIT_HALF[key] = ok
    return ok


def _select_rows(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row of ``mask`` ``(B, n)``, padded to ``count``.

    Returns ``(idx, valid)`` of shape ``(B, count)``; padding slots point at index 0, valid False.
    """
    n = mask.shape[-1]
    key = torch.where(mask, torch.arange(n, device=mask.device), n + torch.arange(n, device=mask.device))
    idx = torch.sort(key, dim=-1).values[..., :count]
    valid = idx < n
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def _select_heads(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_select_rows` for ``(B, H, n)`` masks."""
    b, h, n = mask.shape
    idx, valid = _select_rows(mask.reshape(b * h, n), count)
    return idx.reshape(b, h, count), valid.reshape(b, h, count)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, t], :]`` for ``x`` ``(B, H, T, D)`` and ``idx`` ``(B, H, K)``."""
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))


class NexusQuantCache(Cache):
    """A transformers cache holding E8 codes, for ``generate(past_key_values=...)`` or ``forward``.

    Parameters
    ----------
    config : PretrainedConfig or PreTrainedModel
        The model's config (or the model).
    preset : str or CompressionSettings
        ``"high"``, ``"balanced"`` or ``"max"`` (see ``nexusquant.presets``).
    record_positions : bool
        Keep every kept token's original sequence index even where attention does not need it (for
        inspection); the extra bytes are counted.
    **knobs
        Override any :class:`CompressionSettings` field (``evict=0.6``, ``key_bits=3``, ...).

    Under ``attn_implementation="nexusquant"`` (set by ``nexusquant_evict(model)``, or
    ``model.set_attn_implementation("nexusquant")``) the cache compresses right after each
    forward's attention, scores prompt tokens with the real queries, and decode attention reads the
    codes directly. Under any other implementation (SDPA, eager) it works as transformers'
    ``QuantizedCache`` does: each layer's keys and values are dequantized for its attention, one
    layer at a time, and compression happens before the next forward (see
    :meth:`NexusQuantLayer.catch_up` for what differs).

    Made with the model (not its config) and ``key_domain="pre_rope"``, the cache hooks the model's
    attention modules to record the rotary angles of the tokens it holds, as ``nexusquant_evict``
    does (the hooks act on calls that carry this cache only, and go when the cache goes).
    """

    # Set when the cache records its own rotary angles: a nexusquant_evict session leaves them to it.
    records_own_rope = False

    def __init__(
        self,
        config: Any,
        preset: Union[str, CompressionSettings] = "balanced",
        record_positions: bool = False,
        **knobs: Any,
    ):
        model = None
        if hasattr(config, "config") and hasattr(config, "forward"):
            model, config = config, config.config
        self.settings = resolve_settings(preset, **knobs)
        self.rope_tables: dict[int, RopeTable] = {}
        self.fingerprint = model_fingerprint(config)
        # ids of the cached tokens (B, N), recorded by nexusquant_evict or restored by load_cache
        self.token_ids: Optional[torch.Tensor] = None
        plan = layer_plan(config)
        hybrid = is_hybrid(plan)
        layers = [
            NexusQuantLayer(self.settings, w, record_positions, self.rope_tables, in_hybrid_model=hybrid) for w in plan
        ]
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        for i, layer in enumerate(layers):
            layer.attn_config = weakref.ref(text)
            layer.layer_idx = i
        super().__init__(layers=list(layers))  # a copy mypy types as Cache's (invariant) list of layers
        if model is not None and self.settings.key_domain == "pre_rope":
            self._record_own_rope(model, plan)

    def _record_own_rope(self, model: torch.nn.Module, plan: list[Optional[int]]) -> None:
        """Hook ``model``'s attention modules so that every forward with this cache records its
        rotary angles (:class:`~nexusquant.rope.RopeRecorder`). The hooks hold the cache weakly
        and are removed when it is collected."""
        recorder = RopeRecorder(plan, model)
        me = weakref.ref(self)
        state = {"forward": 0}

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            cache = me()
            if cache is None or find_cache(args, kwargs) is not cache:
                return
            idx = module.layer_idx
            assert isinstance(idx, int)  # attention_modules picks modules with one
            if idx == 0:
                state["forward"] = next_forward_id()
            recorder.record(module, kwargs, cache.rope_tables, cache.layers[idx], state["forward"])

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
        weakref.finalize(self, _remove_hooks, handles)
        self.records_own_rope = True

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickle) has no hooks of its own: it must not claim to record its
        # angles, so that a nexusquant_evict session records them for it (or the clear error says
        # what to do).
        state = self.__dict__.copy()
        state.pop("records_own_rope", None)
        return state

    def get_mask_sizes(self, query_length: Any, layer_idx: int) -> tuple[int, int]:
        """transformers sizes a forward's masks here, before any layer runs: the moment to compress
        what a forward under another attention implementation left (:meth:`NexusQuantLayer.catch_up`),
        so that each layer's keys match the mask."""
        for layer in self.layers:
            if isinstance(layer, NexusQuantLayer):
                layer.catch_up()
        return super().get_mask_sizes(query_length, layer_idx)

    def nbytes(self) -> int:
        """Every byte the cache holds (all layers, plus the shared rotary angles for pre-RoPE keys)."""
        return sum(l.nbytes() for l in self.layers if isinstance(l, NexusQuantLayer)) + sum(
            t.nbytes() for t in self.rope_tables.values()
        )

    def compression_stats(self) -> dict[str, Any]:
        """Tokens kept per tier, bytes held and the real ratio against fp16, per layer and overall."""
        return compression_stats(self)


def _remove_hooks(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


def find_cache(args: tuple, kwargs: dict) -> Optional[Cache]:
    """The transformers ``Cache`` among a call's arguments (an attention module's), or None."""
    for v in list(kwargs.values()) + list(args):
        if isinstance(v, Cache):
            return v
    return None


def compression_stats(cache: Cache) -> dict[str, Any]:
    layers = [l for l in cache.layers if isinstance(l, NexusQuantLayer)]
    per_layer = [l.stats() for l in layers]
    rope = sum(t.nbytes() for t in getattr(cache, "rope_tables", {}).values())
    nb = sum(s["nbytes"] for s in per_layer) + rope
    unc = sum(s["fp16_nbytes"] for s in per_layer)
    elements = unc / 2
    return {
        "layers": per_layer,
        "nbytes": nb,
        "rope_nbytes": rope,
        "fp16_nbytes": unc,
        "ratio": unc / nb if nb else math.nan,
        "bits_per_element": 8 * nb / elements if elements else math.nan,
    }
