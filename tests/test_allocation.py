"""Table-driven tests of :func:`nexusquant.allocation.allocate_tokens`, every expectation computed by hand.

Budgets: ``n_fine = min(max(round((1 - evict - demote) * prompt_real) - full_precision, 0), real)``
and ``n_coarse = min(round(demote * prompt_real), real - n_fine)``, where ``real`` counts the valid
candidates of a row and ``full_precision = prompt_real - real`` (sinks, the recent window).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch

from nexusquant import NexusQuantError
from nexusquant.allocation import allocate_tokens

T, F = True, False


class Case(NamedTuple):
    scores: Optional[list]  # (B, H, n)
    cand_valid: list  # (B, n)
    prompt_real: list  # (B,)
    evict: float
    demote: float
    shared: bool
    heads: int
    fine: list  # (B, H, n), 0/1
    coarse: list  # (B, H, n), 0/1


CASES = {
    "no scores: every valid candidate to fine, in every head": Case(
        None, [[T, T, F]], [3], 0.5, 0.25, False, 2, [[[1, 1, 0], [1, 1, 0]]], [[[0, 0, 0], [0, 0, 0]]]
    ),
    "no eviction, no demotion: everything to fine": Case(
        [[[0.1, 0.9, 0.5, 0.2]]], [[T, T, T, T]], [4], 0.0, 0.0, False, 1, [[[1, 1, 1, 1]]], [[[0, 0, 0, 0]]]
    ),
    # round(0.5 * 6) = 3 fine: the two 2s (indices 1, 3), then the first of the 1s (index 0).
    "evict 0.5, ties keep sequence order": Case(
        [[[1.0, 2.0, 1.0, 2.0, 1.0, 0.0]]],
        [[T] * 6],
        [6],
        0.5,
        0.0,
        False,
        1,
        [[[1, 1, 0, 1, 0, 0]]],
        [[[0] * 6]],
    ),
    # round(0.5 * 5) = round(2.5) = 2: torch.round halves to even.
    "evict 0.5 of an odd count: half rounds to even": Case(
        [[[5.0, 4.0, 3.0, 2.0, 1.0]]], [[T] * 5], [5], 0.5, 0.0, False, 1, [[[1, 1, 0, 0, 0]]], [[[0] * 5]]
    ),
    # prompt 8, 6 candidates (2 full precision): fine 4 - 2 = 2 -> 0.9, 0.7; coarse 2 -> 0.5, 0.3.
    "demote: next best to coarse, the rest dropped": Case(
        [[[0.5, 0.1, 0.9, 0.3, 0.7, 0.2]]],
        [[T] * 6],
        [8],
        0.25,
        0.25,
        False,
        1,
        [[[0, 0, 1, 0, 1, 0]]],
        [[[1, 0, 0, 1, 0, 0]]],
    ),
    # Row 0: 4 real, fine 2. Row 1: left padding (high scores ignored), 2 real, fine 1 -> index 3.
    # Row 2: all padding, nothing kept.
    "padding rows": Case(
        [[[4.0, 3.0, 2.0, 1.0]], [[9.0, 9.0, 1.0, 2.0]], [[9.0, 9.0, 9.0, 9.0]]],
        [[T, T, T, T], [F, F, T, T], [F, F, F, F]],
        [4, 2, 0],
        0.5,
        0.0,
        False,
        1,
        [[[1, 1, 0, 0]], [[0, 0, 0, 1]], [[0, 0, 0, 0]]],
        [[[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]],
    ),
    "per-head ranking": Case(
        [[[1.0, 0.6, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]]],
        [[T] * 4],
        [4],
        0.5,
        0.0,
        False,
        2,
        [[[1, 1, 0, 0], [0, 0, 1, 1]]],
        [[[0] * 4, [0] * 4]],
    ),
    # Mean over heads: 0.5, 0.3, 0.1, 0.4 -> indices 0 and 3 in both heads.
    "shared across heads: ranked by the mean score": Case(
        [[[1.0, 0.6, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]]],
        [[T] * 4],
        [4],
        0.5,
        0.0,
        True,
        2,
        [[[1, 0, 0, 1], [1, 0, 0, 1]]],
        [[[0] * 4, [0] * 4]],
    ),
    # prompt 10, 4 candidates: fine round(5) - 6 < 0 -> 0, no coarse: all dropped.
    "fine budget below the full-precision tokens: all dropped": Case(
        [[[0.1, 0.4, 0.3, 0.2]]], [[T] * 4], [10], 0.5, 0.0, False, 1, [[[0] * 4]], [[[0] * 4]]
    ),
    # prompt 12, 4 candidates: fine round(6) - 8 < 0 -> 0; coarse round(3) = 3 -> 0.4, 0.3, 0.2.
    "fine budget below the full-precision tokens: coarse still filled": Case(
        [[[0.1, 0.4, 0.3, 0.2]]], [[T] * 4], [12], 0.25, 0.25, False, 1, [[[0, 0, 0, 0]]], [[[0, 1, 1, 1]]]
    ),
    # prompt 10, 2 candidates: fine round(5) - 8 < 0 -> 0; coarse min(round(5), 2 - 0) = 2.
    "coarse budget capped by the candidates": Case(
        [[[0.2, 0.7]]], [[T, T]], [10], 0.0, 0.5, False, 1, [[[0, 0]]], [[[1, 1]]]
    ),
    # prompt 6, 4 candidates: fine round(3) - 2 = 1 -> 0.7; coarse round(1.5) = 2 -> 0.5, 0.3.
    "fine and coarse both partly filled": Case(
        [[[0.3, 0.7, 0.1, 0.5]]], [[T] * 4], [6], 0.25, 0.25, False, 1, [[[0, 1, 0, 0]]], [[[1, 0, 0, 1]]]
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_allocate_tokens(case: Case) -> None:
    scores = None if case.scores is None else torch.tensor(case.scores, dtype=torch.float16)
    to_fine, to_coarse = allocate_tokens(
        scores,
        torch.tensor(case.cand_valid),
        torch.tensor(case.prompt_real),
        case.evict,
        case.demote,
        case.shared,
        case.heads,
    )
    assert to_fine.dtype == torch.bool and to_coarse.dtype == torch.bool
    assert to_fine.tolist() == torch.tensor(case.fine, dtype=torch.bool).tolist()
    assert to_coarse.tolist() == torch.tensor(case.coarse, dtype=torch.bool).tolist()
    assert not bool((to_fine & to_coarse).any())


def test_scores_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(NexusQuantError, match="expected"):
        allocate_tokens(torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([3]), 0.5, 0.0, False, 1)
