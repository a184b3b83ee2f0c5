"""Compression settings: the named presets and the knobs that override them.

A prompt's tokens end in one of four places when prefill ends:

* **full precision**: the first ``sink_tokens`` (attention sinks) and the last ``recent_window``;
* the **fine tier**: keys transform-coded at ``key_rate`` bits per element (``key_codec="pca"``,
  the presets) or E8-coded at ``key_bits``; values E8-coded at ``value_bits`` (1–4 bits, or 16 =
  kept as is);
* the **coarse tier** ("demoted"): E8 codes at ``coarse_key_bits`` / ``coarse_value_bits``;
* **dropped** (evicted): gone for good.

``evict`` and ``demote`` are fractions of each prompt's real tokens; the fine tier gets what is left.
Which tokens go where is decided per layer and per KV head by the importance ``scorer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ._core import NexusQuantError
from .scoring import SCORERS

__all__ = ["CompressionSettings", "PRESETS", "E8_PRESETS", "resolve_settings"]

_KEY_DOMAINS = ("post_rope", "pre_rope")
_TIER_BITS = (1, 2, 3, 4, 16)
_KEY_CODECS = ("e8", "pca")


@dataclass(frozen=True)
class CompressionSettings:
    """Everything that decides what the compressed cache holds.

    Parameters
    ----------
    evict : float
        Fraction of each prompt's real tokens dropped, in [0, 1).
    demote : float
        Fraction of each prompt's real tokens kept in the coarse tier.
    key_bits, value_bits : int
        Bits per dimension of the fine tier's codes (1–4), or 16 to keep it unquantized.
    coarse_key_bits, coarse_value_bits : int
        Bits per dimension of the coarse tier (1–4, or 16).
    sink_tokens : int
        First real tokens of each prompt kept in full precision (attention sinks, at least BOS).
    recent_window : int
        Last tokens kept in full precision; generated tokens join this window and are compressed
        into the fine tier in blocks of ``block`` once it holds ``recent_window + block``.
    block : int
        Generated tokens compressed at a time.
    scorer : str
        ``"query"``: attention of the real queries of the last ``score_window`` prompt tokens,
        averaged over each KV head's query group; ``"key-key"`` (the published method): the last
        ``score_window`` keys used as pseudo-queries, averaged over heads.
    score_window : int
        Prompt tokens whose queries (or keys) score the rest.
    pool_kernel : int
        Width of the average pooling applied to the scores (odd; 1 = none), so that a kept token
        keeps some of its neighbours.
    key_domain : str
        ``"post_rope"``: keys are quantized as the model made them (rotary embedding applied);
        ``"pre_rope"``: the rotary embedding is undone before quantization and redone after.
    key_codec : str
        ``"e8"``: each key vector rotated and E8-coded with its own scale (``key_bits``);
        ``"pca"``: the transform coder (``nexusquant.transform``): per layer, the prompt's own
        principal components of the keys of all KV heads, bits by reverse water-filling for a budget
        of ``key_rate`` bits per element. With ``"pca"``, tokens are kept or dropped per layer (all
        KV heads alike) and sliding-window layers keep the E8 codec.
    key_attention_share : float
        With ``key_codec="pca"``: the share, in [0, 1], of each token's weight in the basis fit and
        the quantizer steps that comes from the attention the prompt's last ``score_window`` queries
        pay it (not pooled, whatever the ``scorer``), the rest spread evenly over the tokens. A key
        error moves the output in proportion to the attention its token gets, so bits go to the
        tokens that are read; an even share stays because a token nobody read yet may be read
        later. 0 = every token alike. Needs the nexusquant attention (under SDPA or eager
        attention there are no queries to measure, and the fit is even).
    value_refine_share : float
        Share, in [0, 1], of each prompt's fine-tier tokens per KV head, the most attended by the
        prompt's last ``score_window`` queries (not pooled), whose value code's error is E8-coded
        again at ``value_refine_bits`` and added back: a value error moves the output in proportion
        to the attention its token gets. Each refined vector also holds its index (2 bytes; 4 past
        32K tokens). 0 = off.
        Not in sliding-window layers; needs the nexusquant attention (under SDPA or eager attention
        nothing is refined); CUDA decode then dequantizes the values instead of the fused kernels.
    value_refine_bits : int
        Bits per dimension of the refinement (1-4).
    generated_value_bits : int or None
        Bits per dimension of the values of generated blocks where they have a tier of their own
        (layers with transform-coded keys: their blocks get E8 codes, not the prompt's basis);
        1–4, or 16. None = ``value_bits``. Generated tokens are what the next tokens read most,
        and refinement (``value_refine_share``) does not reach them: a preset that lowers
        ``value_bits`` and refines the prompt's most-read values can keep the generated ones at
        the old width. Layers with E8 keys code generated blocks in the fine tier, at
        ``value_bits``.
    key_rate : float
        Bits per key element of the ``"pca"`` coder for the prompt, everything included: codes,
        the basis (int8), its mean, steps and widths, spread over the prompt's compressed tokens
        (so a short prompt affords fewer components). Generated blocks reuse the basis and pay for
        their codes only.
    sliding_key_bits : int or None
        In a model with both sliding-window and global layers (Gemma-2/3), bits per dimension of
        the sliding layers' keys (E8 codes whatever the ``key_codec``; 1-4, or 16). None =
        ``key_bits``; setting ``key_bits`` explicitly resets a preset's value to None.
    global_key_rate : float or None
        With ``key_codec="pca"``, in such a model: the ``key_rate`` of its global (full-attention)
        layers. None = ``key_rate`` (setting ``key_rate`` explicitly resets a preset's value to
        None). The few global layers are the only ones that read the whole prompt and hold a small
        share of the cache, so their keys are worth more bits than a sliding layer's (docs/EVAL.md,
        "Models with sliding layers"). A model with one kind of layer only (SmolLM2, Llama, or
        Mistral sliding in every layer) ignores both knobs.
    seed : int
        Seed of the Hadamard rotation's random signs.
    center : bool
        Subtract each KV head's mean key and value (over the first compressed tokens) before
        quantization and add it back after.
    """

    evict: float = 0.5
    demote: float = 0.0
    key_bits: int = 2
    value_bits: int = 2
    coarse_key_bits: int = 1
    coarse_value_bits: int = 1
    sink_tokens: int = 4
    recent_window: int = 32
    block: int = 64
    scorer: str = "query"
    score_window: int = 32
    pool_kernel: int = 7
    key_domain: str = "post_rope"
    key_codec: str = "e8"
    key_rate: float = 1.5
    sliding_key_bits: Optional[int] = None
    global_key_rate: Optional[float] = None
    key_attention_share: float = 0.0
    value_refine_share: float = 0.0
    value_refine_bits: int = 2
    generated_value_bits: Optional[int] = None
    seed: int = 0
    center: bool = True

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise NexusQuantError(msg)

        for name in ("evict", "demote"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{name} must be a number, got {v!r}")
            check(0.0 <= v < 1.0, f"{name} must be in [0, 1), got {v}")
        check(self.evict + self.demote < 1.0, f"evict + demote must stay below 1, got {self.evict + self.demote}")
        for name in ("key_bits", "value_bits", "coarse_key_bits", "coarse_value_bits"):
            v = getattr(self, name)
            check(v in _TIER_BITS and not isinstance(v, bool), f"{name} must be one of {_TIER_BITS}, got {v!r}")
        for name, lo in (
            ("sink_tokens", 0),
            ("recent_window", 1),
            ("block", 1),
            ("score_window", 1),
            ("pool_kernel", 1),
        ):
            v = getattr(self, name)
            check(
                isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                f"{name} must be an integer >= {lo}, got {v!r}",
            )
        check(self.pool_kernel % 2 == 1, f"pool_kernel must be odd, got {self.pool_kernel}")
        check(self.scorer in SCORERS, f"scorer must be one of {sorted(SCORERS)}, got {self.scorer!r}")
        check(self.key_domain in _KEY_DOMAINS, f"key_domain must be one of {_KEY_DOMAINS}, got {self.key_domain!r}")
        check(self.key_codec in _KEY_CODECS, f"key_codec must be one of {_KEY_CODECS}, got {self.key_codec!r}")
        check(
            isinstance(self.key_rate, (int, float))
            and not isinstance(self.key_rate, bool)
            and 0.0 < self.key_rate <= 8.0,
            f"key_rate must be a number in (0, 8], got {self.key_rate!r}",
        )
        check(
            self.sliding_key_bits is None
            or (self.sliding_key_bits in _TIER_BITS and not isinstance(self.sliding_key_bits, bool)),
            f"sliding_key_bits must be None or one of {_TIER_BITS}, got {self.sliding_key_bits!r}",
        )
        check(
            self.global_key_rate is None
            or (
                isinstance(self.global_key_rate, (int, float))
                and not isinstance(self.global_key_rate, bool)
                and 0.0 < self.global_key_rate <= 8.0
            ),
            f"global_key_rate must be None or a number in (0, 8], got {self.global_key_rate!r}",
        )
        check(
            isinstance(self.key_attention_share, (int, float))
            and not isinstance(self.key_attention_share, bool)
            and 0.0 <= self.key_attention_share <= 1.0,
            f"key_attention_share must be a number in [0, 1], got {self.key_attention_share!r}",
        )
        check(
            isinstance(self.value_refine_share, (int, float))
            and not isinstance(self.value_refine_share, bool)
            and 0.0 <= self.value_refine_share <= 1.0,
            f"value_refine_share must be a number in [0, 1], got {self.value_refine_share!r}",
        )
        check(
            self.value_refine_bits in (1, 2, 3, 4) and not isinstance(self.value_refine_bits, bool),
            f"value_refine_bits must be one of (1, 2, 3, 4), got {self.value_refine_bits!r}",
        )
        check(
            self.generated_value_bits is None
            or (self.generated_value_bits in _TIER_BITS and not isinstance(self.generated_value_bits, bool)),
            f"generated_value_bits must be None or one of {_TIER_BITS}, got {self.generated_value_bits!r}",
        )
        check(
            isinstance(self.seed, int) and 0 <= self.seed < 2**64,
            f"seed must be a non-negative integer, got {self.seed!r}",
        )
        check(isinstance(self.center, bool), "center must be True or False")

    def replace(self, **changes: Any) -> CompressionSettings:
        """A copy with some knobs changed (unknown knobs raise NexusQuantError)."""
        return resolve_settings(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Chosen with `benches/tune_presets.py` (SmolLM2-135M, bf16, 1024-token prefixes from the middle of
# the packaged texts, held out from the README's evaluation, other pass-key seeds), and checked on
# Gemma-3-270M. What the measurements said (docs/EVAL.md has every number):
# - keys are the cost and they are low-rank: the transform coder (`key_codec="pca"`, keys before
#   RoPE, the prompt's own principal components in the queries' metric) at 3 / 2 / 1.5 bits per
#   element costs a fraction of what E8 codes at the same bytes cost, and keeps the pass keys;
# - eviction is what loses facts and costs most of the perplexity: 30% evicted on top of 1.5-bit
#   keys took lcet10's middle from -1% to +32% and half the pass keys, so no preset evicts;
# - values are not low-rank: they keep per-vector E8 codes, 4 / 3 / 2 bits;
# - E8 codes still serve sliding-window layers and the generated blocks of transform-coded layers,
#   at 4 bits in `high`: on Gemma-3 (15 of 18 layers slide) `high` with 3-bit sliding keys cost
#   +2.9% where 4-bit ones cost +1.9% (4096 tokens, held-out middles).
# - models that mix sliding and global layers (Gemma-2/3): the few global layers read the whole
#   prompt and hold a small share of the cache at short prompts, so their keys get more bits
#   (4 / 4 / 3 b/elem) and, in `balanced` and `max`, the sliding layers' keys fewer (3-bit E8): on
#   Gemma-3-270M at 1024 tokens (held-out middles) `high` +3.5% -> +1.4% for 3% of ratio, `max`
#   +14.5% -> +10.9% at a higher ratio; at 4096 on the old curve or below it (docs/EVAL.md, "Models
#   with sliding layers"). SmolLM2 has one kind of layer: its presets are unchanged.
# - `max` fits its key basis half on the attention of the prompt's last queries
#   (`key_attention_share=0.5`): lower mean perplexity in every measurement (SmolLM2 at 1024 and
#   4096 tokens, beginnings and held-out middles; Gemma-3 at 1024), one pass key fewer of 21 on
#   each model; `balanced`'s sign flipped with the text and the length, so it keeps 0.
# The presets before December 2026 (E8 keys after RoPE, eviction for ratio) are E8_PRESETS: the
# eval runs them beside the presets, and `quality=E8_PRESETS["balanced"]` still selects them.
_TRANSFORM_CODED = CompressionSettings(
    evict=0.0, demote=0.0, key_codec="pca", key_domain="pre_rope", key_bits=4, recent_window=16
)
PRESETS: dict[str, CompressionSettings] = {
    "high": dataclasses.replace(_TRANSFORM_CODED, key_rate=3.0, value_bits=4, global_key_rate=4.0),
    "balanced": dataclasses.replace(
        _TRANSFORM_CODED, key_rate=2.0, value_bits=3, sliding_key_bits=3, global_key_rate=4.0
    ),
    "max": dataclasses.replace(
        _TRANSFORM_CODED,
        key_rate=1.5,
        value_bits=2,
        sliding_key_bits=3,
        global_key_rate=3.0,
        key_attention_share=0.5,
    ),
}
# The E8 presets of the first release: each key vector rotated and E8-coded after RoPE, eviction
# for ratio. Their fused decode kernel is the fastest GPU path; their quality is in the README.
E8_PRESETS: dict[str, CompressionSettings] = {
    "high": CompressionSettings(evict=0.0, demote=0.0, key_bits=3, value_bits=2, recent_window=16),
    "balanced": CompressionSettings(evict=0.5, demote=0.0, key_bits=3, value_bits=2, recent_window=16),
    "max": CompressionSettings(evict=0.75, demote=0.0, key_bits=3, value_bits=2, recent_window=8),
}


def resolve_settings(quality: str | CompressionSettings = "balanced", **overrides: Any) -> CompressionSettings:
    """Settings of a named preset (or given settings) with explicit knobs overriding it.

    Raises NexusQuantError for an unknown preset, an unknown knob or a bad value.
    """
    if isinstance(quality, CompressionSettings):
        base = quality
    elif isinstance(quality, str) and quality in PRESETS:
        base = PRESETS[quality]
    else:
        raise NexusQuantError(f"unknown quality preset {quality!r}: use one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(CompressionSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise NexusQuantError(f"unknown setting(s) {unknown}; known settings: {sorted(known)}")
    # A knob set explicitly holds in every layer: a preset's bits for one kind of layer follow it
    # (``key_bits=16`` means exact keys, sliding layers included), unless they are set too.
    for knob, refinement in (
        ("key_bits", "sliding_key_bits"),
        ("key_rate", "global_key_rate"),
        ("value_bits", "generated_value_bits"),
    ):
        if knob in overrides and refinement not in overrides:
            overrides[refinement] = None
    return dataclasses.replace(base, **overrides)
