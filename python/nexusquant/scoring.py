"""Importance scores of prompt tokens, per layer and per KV head.

Both scorers return ``(B, H_kv, T)`` float32 scores for the keys of a layer (higher = keep):

* ``query_importance``: the attention the real queries of the last prompt tokens pay to each key
  (softmax over all keys, summed over those queries, averaged over the query heads of each KV
  group), the SnapKV observation that the end of a prompt predicts what generation will read;
* ``key_key_importance``: the published nexusquant method, the last keys used as pseudo-queries
  against all keys, softmax, summed, averaged over heads (one score per token, shared by heads).

Scores are then average-pooled along tokens so that a kept token keeps some of its context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["query_importance", "key_key_importance", "pool_scores", "register_scorer", "SCORERS", "ScoreInputs"]


@dataclass
class ScoreInputs:
    """What a scorer may look at when a layer's prompt tokens are compressed.

    ``key``/``value`` are every key and value the prompt's queries attended to ``(B, H_kv, T, D)``
    (post-RoPE), of which the last ``window`` are the candidates being scored (the ones before are
    already compressed); ``query`` is the forward's queries ``(B, H_q, q, D)``; ``allowed`` the bool
    mask ``(B or 1, H_kv or 1, w, T)`` the LAST ``w`` of those queries attended with (w = the
    settings' ``score_window``, or q if smaller); ``window_valid`` bool
    ``(B, window)`` marks real (non-padding) candidates; ``layer`` is the cache layer (its
    ``settings`` hold ``score_window`` and ``pool_kernel``) and ``module`` the attention module.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    allowed: torch.Tensor
    window: int
    window_valid: torch.Tensor
    scaling: float
    softcap: Optional[float]
    layer: Any
    module: Any


# name -> fn(ScoreInputs) -> float scores (B, H_kv, window); higher = keep.
SCORERS: dict[str, Callable[[ScoreInputs], torch.Tensor]] = {}


def register_scorer(name: str, fn: Callable[[ScoreInputs], torch.Tensor]) -> None:
    """Make ``scorer=name`` available to the cache (used by the evaluation's peer methods)."""
    SCORERS[name] = fn


def _masked_softmax(logits: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # rows with nothing allowed (padding queries) score nothing


def query_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: Optional[torch.Tensor],
    scaling: float,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention of the given queries to every key, summed over queries, averaged per KV group.

    Parameters
    ----------
    query : torch.Tensor
        ``(B, H_q, W, D)``: the queries of the last W prompt tokens.
    key : torch.Tensor
        ``(B, H_kv, T, D)``: all keys those queries attend to.
    allowed : torch.Tensor or None
        bool, broadcastable to ``(B, H_kv, W, T)``: which key each query may see (causal, padding).
    scaling : float
        The model's attention scale.
    softcap : float, optional
        Logit soft-capping (Gemma-2), applied as the model does.
    """
    b, hq, w, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    q = query.float().reshape(b, hkv, g * w, d)
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, Hkv, g*W, T)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.reshape(b, hkv, g, w, -1)
    if allowed is not None:
        allowed = allowed.reshape(allowed.shape[0], allowed.shape[1], 1, w, -1)
    probs = _masked_softmax(logits, allowed)
    return probs.sum(dim=3).mean(dim=2)


def key_key_importance(
    key: torch.Tensor,
    window: int,
    allowed_keys: Optional[torch.Tensor],
) -> torch.Tensor:
    """The published scorer: the last ``window`` keys as pseudo-queries, averaged over heads.

    Parameters
    ----------
    key : torch.Tensor
        ``(B, H_kv, T, D)``.
    window : int
        How many of the last keys act as queries.
    allowed_keys : torch.Tensor or None
        bool ``(B, T)``: keys that exist (False for padding).
    """
    b, h, t, d = key.shape
    w = min(window, t)
    k = key.float()
    logits = torch.matmul(k[:, :, -w:], k.transpose(-1, -2)) / d**0.5  # (B, H, W, T)
    allowed = None if allowed_keys is None else allowed_keys[:, None, None, :]
    probs = _masked_softmax(logits, allowed)
    score = probs.sum(dim=2).mean(dim=1, keepdim=True)  # (B, 1, T)
    return score.expand(b, h, t).contiguous()


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool ``(B, H, T)`` scores along tokens with an odd ``kernel`` (1 = unchanged)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    b, h, t = scores.shape
    pooled = F.avg_pool1d(scores.reshape(b * h, 1, t), kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled.reshape(b, h, t)


def _query_scorer(x: ScoreInputs) -> torch.Tensor:
    s = x.layer.settings
    wq = x.allowed.shape[-2]
    scores = query_importance(x.query[:, :, -wq:], x.key, x.allowed, x.scaling, x.softcap)
    return pool_scores(scores[..., -x.window :], s.pool_kernel)


def _key_key_scorer(x: ScoreInputs) -> torch.Tensor:
    s = x.layer.settings
    scores = key_key_importance(x.key[:, :, -x.window :], s.score_window, x.window_valid)
    return pool_scores(scores, s.pool_kernel)


register_scorer("query", _query_scorer)
register_scorer("key-key", _key_key_scorer)
