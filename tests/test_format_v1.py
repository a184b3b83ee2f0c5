"""A version-1 ``.nqkv`` file written by an earlier build still loads and continues exactly.

``tests/data/`` holds a tiny random Llama (bf16 safetensors, run in float32), a cache of a
100-token prompt saved with ``quality="balanced"`` (E8 codes, entropy-packed) and the logits of the
next token after it; ``tests/data/make_v1_fixture.py`` made them (and says when to remake them:
only with a new format version). A change to what ``save_cache`` writes or ``load_cache`` reads
that breaks old files fails here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nexusquant as nq
from nexusquant._core import read_nqkv

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("make_v1_fixture", DATA / "make_v1_fixture.py")
assert _spec is not None and _spec.loader is not None
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)


@pytest.fixture(scope="module")
def model():
    return fixture.load_model()


def test_v1_file_loads_and_continues_exactly(model):
    cache = nq.load_cache(fixture.CACHE_FILE, model)
    prompt, _ = fixture.prompt_and_next()
    assert torch.equal(cache.token_ids, prompt)
    logits = fixture.next_logits(model, cache)
    expected = torch.from_numpy(np.load(fixture.LOGITS_FILE))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_v1_file_saves_back_byte_for_byte(model, tmp_path):
    """Loading and saving again gives the same sections: META (but for the writer's version), the
    token ids and every array, bit for bit."""
    again = tmp_path / "again.nqkv"
    nq.save_cache(nq.load_cache(fixture.CACHE_FILE, model), again)
    old, new = read_nqkv(fixture.CACHE_FILE), read_nqkv(again)
    assert [k for k, _ in old] == [k for k, _ in new]
    old_meta, new_meta = (json.loads(bytes(s[0][1])) for s in (old, new))
    old_meta.pop("nexusquant_version")
    new_meta.pop("nexusquant_version")
    assert old_meta == new_meta
    for (kind, a), (_, b) in zip(old[1:], new[1:]):
        if kind == "TOKN":
            assert bytes(a) == bytes(b)
            continue
        assert sorted(a) == sorted(b)
        for name in a:
            if isinstance(a[name], bytes):
                assert a[name] == b[name], name
            else:
                assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_state_dicts_carry_a_loaded_cache(model):
    """Layers' and tiers' state_dict()/load_state_dict() move everything a file holds: a fresh
    cache given the loaded one's states continues to the stored logits."""
    loaded = nq.load_cache(fixture.CACHE_FILE, model)
    fresh = nq.load_cache(fixture.CACHE_FILE, model)
    for src, dst in zip(loaded.layers, fresh.layers):
        dst.load_state_dict({name: None for name in src.state_dict()})
        dst.load_state_dict(src.state_dict())
        for tier in ("fine", "coarse"):
            getattr(dst, tier).load_state_dict(getattr(src, tier).state_dict())
    expected = torch.from_numpy(np.load(fixture.LOGITS_FILE))
    torch.testing.assert_close(fixture.next_logits(model, fresh), expected, atol=1e-5, rtol=1e-5)
