"""Token allocation: which compression candidates go to the fine tier, the coarse tier, or nowhere.

A pure function of scores and validity masks, kept apart from :class:`~nexusquant.cache.NexusQuantLayer`
so the decision can be tested on hand-made tables.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._core import NexusQuantError

__all__ = ["allocate_tokens"]


def allocate_tokens(
    scores: Optional[torch.Tensor],
    cand_valid: torch.Tensor,
    prompt_real: torch.Tensor,
    evict: float,
    demote: float,
    shared_across_heads: bool,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the candidates of each row and KV head between the fine tier, the coarse tier and eviction.

    Parameters
    ----------
    scores : torch.Tensor or None
        float ``(B, H, n)`` importance of every candidate; None keeps every valid candidate in the
        fine tier (a generation block, or a layer that never evicts).
    cand_valid : torch.Tensor
        bool ``(B, n)``: the real candidates (padding, sinks and tokens outside a sliding window are
        False).
    prompt_real : torch.Tensor
        int ``(B,)``: real tokens of the segment the budgets are fractions of. Those that are not
        candidates (sinks, the recent window) are full precision and count towards the fine share.
    evict, demote : float
        fractions of ``prompt_real`` dropped and sent to the coarse tier.
    shared_across_heads : bool
        rank tokens by their mean score over heads, keeping the same tokens in every head (the fine
        tier's keys are transform-coded, all heads of a token together).
    heads : int
        ``H``, the number of KV heads.

    Returns
    -------
    (to_fine, to_coarse) : tuple of torch.Tensor
        bool ``(B, H, n)``, disjoint, both False where ``cand_valid`` is. Within a row and head the
        highest scores go to the fine tier, the next to the coarse tier; ties keep sequence order.
    """
    b, n = cand_valid.shape
    if scores is None:
        to_fine = cand_valid[:, None, :].expand(b, heads, n)
        return to_fine, torch.zeros_like(to_fine)
    if scores.shape != (b, heads, n):
        raise NexusQuantError(f"internal: scores have shape {tuple(scores.shape)}, expected {(b, heads, n)}")
    real = cand_valid.sum(1)  # (B,) candidates per row
    n_fine_total = torch.round((1.0 - evict - demote) * prompt_real.float()).long()
    n_coarse = torch.round(demote * prompt_real.float()).long()
    full_precision = prompt_real - real
    n_fine = torch.minimum(torch.clamp(n_fine_total - full_precision, min=0), real)
    n_coarse = torch.minimum(n_coarse, real - n_fine)
    sc = scores.float()
    if shared_across_heads:
        sc = sc.mean(1, keepdim=True).expand(b, heads, n)
    sc = sc.masked_fill(~cand_valid[:, None, :], float("-inf"))
    order = torch.argsort(sc, dim=-1, descending=True, stable=True)  # (B, H, n)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=scores.device).expand(b, heads, n))
    to_fine = (rank < n_fine[:, None, None]) & cand_valid[:, None, :]
    to_coarse = (rank >= n_fine[:, None, None]) & (rank < (n_fine + n_coarse)[:, None, None]) & cand_valid[:, None, :]
    return to_fine, to_coarse
