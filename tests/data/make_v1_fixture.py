"""Regenerate the version-1 ``.nqkv`` fixture that ``tests/test_format_v1.py`` loads.

    python tests/data/make_v1_fixture.py            # writes v1-llama-balanced.nqkv and its logits
    python tests/data/make_v1_fixture.py --model    # also rewrites tiny-llama/ (the model itself)

The fixture pins the file format: run this only when the format changes on purpose (a new format
version), never to make a failing test pass. The model is saved once, in bfloat16 (under 1 MB), and
run in float32, so the expected logits do not depend on how a torch version rounds bf16 matmuls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "tiny-llama"
CACHE_FILE = HERE / "v1-llama-balanced.nqkv"
LOGITS_FILE = HERE / "v1-llama-balanced.next-logits.npy"
PROMPT_TOKENS = 100
KNOBS = dict(quality="balanced")


def prompt_and_next() -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(1, PROMPT_TOKENS)`` prompt and the ``(1, 1)`` token fed after it."""
    ids = torch.randint(3, 90, (1, PROMPT_TOKENS + 1), generator=torch.Generator().manual_seed(13))
    return ids[:, :PROMPT_TOKENS], ids[:, PROMPT_TOKENS:]


def load_model():
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def next_logits(model, cache) -> torch.Tensor:
    """Logits ``(1, vocab)`` float32 of the next token after the cached prompt."""
    import nexusquant as nq
    from nexusquant.compat import with_cache

    _, nxt = prompt_and_next()
    with nq.nexusquant_evict(model, **KNOBS), torch.no_grad():
        return model(nxt, use_cache=True, **with_cache(model, cache)).logits[:, -1].float()


def main() -> None:
    from transformers import DynamicCache

    import nexusquant as nq
    from nexusquant.compat import with_cache

    if "--model" in sys.argv or not MODEL_DIR.exists():
        sys.path.insert(0, str(HERE.parent))
        from tiny_models import make_tiny

        make_tiny("llama", dtype=torch.bfloat16).save_pretrained(MODEL_DIR)
    model = load_model()
    prompt, _ = prompt_and_next()
    with nq.nexusquant_evict(model, **KNOBS), torch.no_grad():
        cache = DynamicCache()
        model(prompt, use_cache=True, **with_cache(model, cache))
    nq.save_cache(cache, CACHE_FILE)
    logits = next_logits(model, nq.load_cache(CACHE_FILE, model))
    # Loading is exact: the step after the loaded cache is the step after the one in memory.
    assert torch.equal(logits, next_logits(model, cache))
    np.save(LOGITS_FILE, logits.numpy())


if __name__ == "__main__":
    main()
