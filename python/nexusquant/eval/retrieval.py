"""Pass-key retrieval: a random number planted in the prefix, asked for after the prefix is compressed.

A trial's prompt is ``prefix`` tokens of real text (taken at a random offset of the evaluation
text) with the needle sentence spliced in at a depth of 10%..90%; the prefix is prefilled (and
compressed, by the method under test), then the question and the answer are fed one token per
forward through the compressed cache, greedy, as ``generate`` does. The prefix is compressed before
the question is seen, so a scorer cannot use the question to find the needle: the cache must still
hold the fact when a user asks for it. Every method sees exactly the same trials.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["PasskeyTrial", "make_trials", "run_trial", "DEPTHS", "NEEDLE", "QUESTION"]

DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
MAX_ANSWER_TOKENS = 8


@dataclass(frozen=True)
class PasskeyTrial:
    """One retrieval trial: ``context`` (``prefix`` token ids, needle inside), ``question`` ids."""

    key: str
    depth: float
    offset: int
    context: tuple[int, ...]
    question: tuple[int, ...]


def make_trials(tokenizer: Any, text_ids: list[int], prefix: int, n: int, seed: int) -> list[PasskeyTrial]:
    """``n`` trials over ``text_ids``: depth cycles through :data:`DEPTHS`, key and offset are drawn
    from ``random.Random(seed)`` (the same for every method)."""
    rng = random.Random(seed)
    question = tuple(tokenizer(QUESTION, add_special_tokens=False).input_ids)
    trials = []
    for i in range(n):
        key = str(rng.randrange(10000, 100000))
        needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
        hay_len = prefix - len(needle)
        if hay_len < 1:
            raise ValueError(f"prefix {prefix} is too short for the pass-key needle ({len(needle)} tokens)")
        offset = rng.randrange(0, max(1, len(text_ids) - hay_len))
        hay = text_ids[offset : offset + hay_len]
        depth = DEPTHS[i % len(DEPTHS)]
        at = round(depth * hay_len)
        context = tuple(hay[:at]) + tuple(needle) + tuple(hay[at:])
        trials.append(PasskeyTrial(key, depth, offset, context, question))
    return trials


def _first_number(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def run_trial(
    step: Callable[[torch.Tensor], torch.Tensor],
    prefill: Callable[[torch.Tensor], torch.Tensor],
    trial: PasskeyTrial,
    tokenizer: Any,
) -> dict[str, Any]:
    """Run one trial; ``prefill(ids)`` and ``step(ids)`` return the last position's logits ``(V,)``
    over a fresh cache of the method under test.

    Returns ``{"depth", "key", "answer", "correct"}``.
    """
    prefill(torch.tensor([trial.context]))
    logits = None
    for tok in trial.question:
        logits = step(torch.tensor([[tok]]))
    answer_ids: list[int] = []
    text = ""
    for _ in range(MAX_ANSWER_TOKENS):
        assert logits is not None
        nxt = int(torch.argmax(logits).item())
        answer_ids.append(nxt)
        text = tokenizer.decode(answer_ids)
        digits = _first_number(text)
        # Stop once the number is complete (a non-digit follows it) or already too long.
        if len(digits) > len(trial.key) or (digits and not text.endswith(digits)):
            break
        logits = step(torch.tensor([[nxt]]))
    answer = _first_number(text)
    return {"depth": trial.depth, "key": trial.key, "answer": answer, "correct": answer == trial.key}
