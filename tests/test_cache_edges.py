"""The cache at its edges: under any attention implementation, copied, pickled, and the session's
statistics after ``generate`` has returned."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from tiny_models import make_tiny

import nexusquant as nq
from nexusquant.cache import NexusQuantLayer
from nexusquant.compat import with_cache


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, n), generator=g)


@torch.no_grad()
def _logits(model, cache, ids, prompt: int):
    """Prefill ``ids[:, :prompt]``, then one forward per remaining token."""
    out = [model(ids[:, :prompt], **with_cache(model, cache), use_cache=True).logits]
    for i in range(prompt, ids.shape[1]):
        out.append(model(ids[:, i : i + 1], **with_cache(model, cache), use_cache=True).logits)
    return torch.cat(out, 1)


def test_session_stats_after_generate_returns():
    """README quickstart 1: stats() after the block, when generate's own cache is out of scope."""
    model = make_tiny("llama")
    with nq.nexusquant_evict(model, recent_window=8) as session:
        model.generate(_ids(60), max_new_tokens=4, do_sample=False, pad_token_id=0)
    stats = session.stats()
    assert stats["ratio"] > 1.0 and sum(l["fine"] for l in stats["layers"]) > 0


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "gemma2", "gpt_neox"])
def test_cache_under_another_attention_equals_nexusquant_attention_without_eviction(family):
    """A NexusQuantCache under SDPA (eager for Gemma-2) dequantizes one layer at a time and compresses
    before the next forward: with nothing evicted, the logits equal those under "nexusquant". (E8
    keys: the transform coder fits its basis in the metric of the prompt's queries, which only
    nexusquant's attention sees; under SDPA it takes the keys' plain principal components.)"""
    knobs = dict(evict=0.0, recent_window=8, block=8, key_codec="e8", key_domain="post_rope")
    ids = _ids(130, seed=3)
    model = make_tiny(family)
    other = model.config._attn_implementation
    assert other in ("sdpa", "eager")
    cache = nq.NexusQuantCache(model, **knobs)
    got = _logits(model, cache, ids, 100)
    model.set_attn_implementation("nexusquant")
    ref_cache = nq.NexusQuantCache(model, **knobs)
    ref = _logits(model, ref_cache, ids, 100)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert cache.nbytes() == ref_cache.nbytes()
    assert cache.compression_stats()["ratio"] > 1.2  # it really compressed


def test_cache_under_sdpa_evicts_and_generates():
    model = make_tiny("llama")
    assert model.config._attn_implementation == "sdpa"
    cache = nq.NexusQuantCache(model, preset=nq.E8_PRESETS["balanced"], recent_window=8)  # it evicts
    out = model.generate(_ids(120), **with_cache(model, cache), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 126
    stats = cache.compression_stats()
    assert sum(l["dropped"] for l in stats["layers"]) > 0  # the key-key scorer evicted, without queries
    assert stats["ratio"] > 2.0


def test_deepcopy_reuses_a_prompt_cache_for_several_continuations():
    """transformers' documented prompt reuse: copy.deepcopy(cache) per continuation; both copies
    continue exactly as the original would, and neither changes the other."""
    model = make_tiny("llama")
    ids = _ids(110, seed=5)
    with nq.nexusquant_evict(model, recent_window=8, block=8) as session, torch.no_grad():
        cache = nq.NexusQuantCache(model, recent_window=8, block=8)
        model(ids[:, :100], **with_cache(model, cache), use_cache=True)
        before = cache.nbytes()
        first, second = copy.deepcopy(cache), copy.deepcopy(cache)
        a = _logits(model, first, ids[:, 100:], 1)
        b = _logits(model, second, ids[:, 100:], 1)
        c = _logits(model, cache, ids[:, 100:], 1)
    del session
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    torch.testing.assert_close(b, c, atol=0, rtol=0)
    assert first.layers[0].seen == 110 and cache.layers[0].seen == 110
    codes = [c.layers[0].fine.keys.rows[0][0].codes for c in (first, cache)]  # transform-coded keys
    assert codes[0].data_ptr() != codes[1].data_ptr()
    assert before < cache.nbytes()


def test_pickle_round_trip_continues_identically():
    model = make_tiny("qwen2")
    ids = _ids(110, seed=6)
    with nq.nexusquant_evict(model, recent_window=8, block=8), torch.no_grad():
        cache = nq.NexusQuantCache(model, recent_window=8, block=8)
        model(ids[:, :100], **with_cache(model, cache), use_cache=True)
        clone = pickle.loads(pickle.dumps(cache))
        assert isinstance(clone.layers[0], NexusQuantLayer) and clone.nbytes() == cache.nbytes()
        a = _logits(model, clone, ids[:, 100:], 1)
        b = _logits(model, cache, ids[:, 100:], 1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_codec_pickles_and_is_shared_by_deepcopy():
    codec = nq.E8Codec(64, 3, seed=7)
    assert copy.deepcopy(codec) is codec
    again = pickle.loads(pickle.dumps(codec))
    assert (again.head_dim, again.bits, again.seed) == (64, 3, 7)
    x = torch.randn(5, 64)
    assert again.encode(x).to_bytes() == codec.encode(x).to_bytes()


@pytest.mark.parametrize(
    "args", [(64, 2, -1), (64, 2, 2**64), (64, 2, 1.5), (2**70, 2, 0), (64, 2**70, 0), (64, "2", 0)]
)
def test_codec_arguments_out_of_range_are_nexusquant_errors(args):
    with pytest.raises(nq.NexusQuantError):
        nq.E8Codec(*args)


def test_nan_in_the_cache_names_layer_and_token():
    model = make_tiny("llama")
    ids = _ids(60, seed=2)

    def poison(module, args, output):  # token 17's key projection in layer 1 becomes NaN
        output = output.clone()
        output[:, 17] = float("nan")
        return output

    handle = model.model.layers[1].self_attn.k_proj.register_forward_hook(poison)
    try:
        with nq.nexusquant_evict(model, recent_window=8, evict=0.0), torch.no_grad():
            with pytest.raises(nq.NexusQuantError, match=r"layer 1: the key of token 17 \(batch row 0, KV head 0\)"):
                model(ids, use_cache=True, **with_cache(model, nq.NexusQuantCache(model, recent_window=8, evict=0.0)))
    finally:
        handle.remove()
