"""Chunked prefill (nexusquant.chunking): a prompt through the model a chunk at a time, each chunk
compressed before the next, inside nexusquant_evict and for a cache managed by hand."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, family_supported, make_tiny

import nexusquant as nq
from nexusquant.cache import STAGING_KEY_RATE, NexusQuantCache, NexusQuantLayer
from nexusquant.compat import output_cache, with_cache

ALL = [f for f in FAMILIES if family_supported(f)]
# No quantization, no eviction: compressed tokens are stored as they are, so chunked prefill must
# reproduce the uncompressed model (a wrong position, mask or cache offset shows at once).
EXACT = dict(evict=0.0, demote=0.0, key_bits=16, value_bits=16, recent_window=8, block=8)


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, n), generator=g)


@pytest.mark.parametrize("family", ALL)
@torch.no_grad()
def test_chunked_prefill_without_compression_is_exact(family):
    model = make_tiny(family)
    ids = _ids(150, seed=1, batch=2)
    ref = model(ids).logits
    # 40: chunks shorter than a sliding window (48 on the tiny Mistral); 100: longer than it.
    for chunk in (40, 100):
        with nq.nexusquant_evict(model, chunk_size=chunk, **EXACT) as session:
            out = model(ids, use_cache=True)
        torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-5)
        cache = output_cache(out)
        assert cache is session.cache
        assert all(isinstance(layer, NexusQuantLayer) for layer in cache.layers)
        # Tokens really left the window chunk by chunk, and the cache knows every token id.
        assert all(layer.seen == 150 for layer in cache.layers)
        assert sum(layer["fine"] for layer in nq.compression_stats(cache)["layers"]) > 0
        assert torch.equal(cache.token_ids, ids)
    assert "forward" not in model.__dict__  # the wrapper is gone after the block


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
@torch.no_grad()
def test_generate_with_chunks_matches_generate(family):
    model = make_tiny(family)
    ids = _ids(130, seed=2, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding in the second row
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with nq.nexusquant_evict(model, chunk_size=32, **EXACT):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("attn", ["nexusquant", "sdpa"])
@torch.no_grad()
def test_prefill_by_hand(attn):
    model = make_tiny("llama")
    ids = _ids(120, seed=3)
    ref = model(ids).logits
    model.set_attn_implementation(attn)
    try:
        cache = NexusQuantCache(model, preset="high", **EXACT)
        out = nq.prefill(model, ids, cache, chunk_size=33, logits_to_keep=0)
        torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-5)
        assert cache.get_seq_length() == 120
        # The last 40 positions span two chunks (99..131 and 132..); keep=1 is the default.
        cache = NexusQuantCache(model, preset="high", **EXACT)
        out = nq.prefill(model, ids, cache, chunk_size=33, logits_to_keep=40)
        torch.testing.assert_close(out.logits, ref[:, -40:], atol=2e-5, rtol=1e-5)
        cache = NexusQuantCache(model, preset="high", **EXACT)
        out = nq.prefill(model, ids[:, :100], cache, chunk_size=33)
        assert out.logits.shape[1] == 1
        # A cache that already holds a prefix is continued.
        out = nq.prefill(model, ids[:, 100:], cache, chunk_size=7, logits_to_keep=0)
        torch.testing.assert_close(out.logits, ref[:, 100:], atol=2e-5, rtol=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_chunked_prefill_compresses_each_chunk():
    """With a preset that evicts (the E8 ``balanced``), each chunk sees itself and the chunk before
    it in full precision, never more, and every chunk is evicted at the preset's share."""
    model = make_tiny("llama")
    ids = _ids(300, seed=4)
    held = []  # full-precision tokens layer 0's attention saw, per forward

    with nq.nexusquant_evict(model, quality=nq.E8_PRESETS["balanced"], chunk_size=64) as session:

        def watch(module, args, output):
            held.append(session.cache.layers[0].last_view.window)

        handle = model.model.layers[0].self_attn.register_forward_hook(watch)
        try:
            model(ids, use_cache=True)
        finally:
            handle.remove()
        stats = session.stats()
    s = nq.E8_PRESETS["balanced"]
    # 300 tokens in chunks of 64: the first chunk alone, then the previous chunk and this one.
    assert held == [64, 128, 128, 128, 64 + 44]
    assert session.cache.layers[0].window_len == s.recent_window  # the last chunk compressed too
    layer = stats["layers"][0]
    # Half of every chunk's real tokens (minus sinks and the recent window) is dropped.
    assert layer["dropped"] > 0.4 * (300 - s.recent_window - s.sink_tokens)
    assert layer["tokens_seen"] == 300


def test_chunk_size_is_checked():
    model = make_tiny("llama")
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(nq.NexusQuantError, match="chunk_size"):
            with nq.nexusquant_evict(model, chunk_size=bad):
                pass
        with pytest.raises(nq.NexusQuantError, match="chunk_size"):
            nq.prefill(model, _ids(10), NexusQuantCache(model), chunk_size=bad)
    assert "forward" not in model.__dict__


@torch.no_grad()
def test_chunked_forward_refuses_what_it_cannot_return():
    model = make_tiny("llama")
    ids = _ids(50)
    with nq.nexusquant_evict(model, chunk_size=16):
        with pytest.raises(nq.NexusQuantError, match="labels"):
            model(ids, labels=ids, use_cache=True)
        with pytest.raises(nq.NexusQuantError, match="output_attentions"):
            model(ids, use_cache=True, output_attentions=True)
        # return_dict=False gets the tuple, logits first.
        assert model(ids, use_cache=True, return_dict=False)[0].shape[1] == 50
        # Short prompts and forwards without a cache are left alone.
        assert model(ids[:, :10], use_cache=True).logits.shape[1] == 10
        assert model(ids, use_cache=False).logits.shape[1] == 50
    with pytest.raises(nq.NexusQuantError, match="input_ids or inputs_embeds"):
        nq.prefill(model, None, NexusQuantCache(model), chunk_size=8)
    with pytest.raises(nq.NexusQuantError, match="attention_mask covers"):
        nq.prefill(model, ids, NexusQuantCache(model), chunk_size=8, attention_mask=torch.ones(1, 20))


@torch.no_grad()
def test_chunked_cache_saves_and_loads(tmp_path):
    model = make_tiny("llama")
    ids = _ids(200, seed=5)
    with nq.nexusquant_evict(model, quality="high", chunk_size=64) as session:
        out = model(ids[:, :190], use_cache=True)
        cache = output_cache(out)
        nq.save_cache(cache, tmp_path / "c.nqkv")
        want = model(ids[:, 190:], **with_cache(model, cache), use_cache=True).logits
    loaded = nq.load_cache(tmp_path / "c.nqkv", model)
    assert torch.equal(loaded.token_ids, ids[:, :190])
    with nq.nexusquant_evict(model, quality="high"):
        got = model(ids[:, 190:], **with_cache(model, loaded), use_cache=True).logits
    torch.testing.assert_close(got, want)
    assert session.stats()["layers"][0]["tokens_seen"] == 200


def test_eval_variant_takes_chunk_size():
    from nexusquant.eval.methods import parse_variant

    m = parse_variant("high:chunk_size=64,evict=0.2")
    assert m.chunk_size == 64
    assert "chunk_size" not in m.settings() and m.settings()["evict"] == 0.2
    with pytest.raises(nq.NexusQuantError, match="chunk_size"):
        parse_variant("high:chunk_size=0")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@torch.no_grad()
def test_chunk_attention_in_row_blocks_is_exact(family, monkeypatch):
    """A chunk's mask over a long prefix is built a block of query rows at a time: with tiny blocks
    the logits are those of the uncompressed model, padding included."""
    import nexusquant.attention as attention

    monkeypatch.setattr(attention, "_MASK_ELEMENTS", 300)  # a few query rows per block
    model = make_tiny(family)
    ids = _ids(120, seed=6, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ref = model(ids, attention_mask=mask).logits
    with nq.nexusquant_evict(model, chunk_size=50, **EXACT):
        got = model(ids, attention_mask=mask, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-5)


def test_lower_right_causal_attention_is_the_masked_attention():
    """A chunk's queries are the last q of T tokens: torch's lower-right causal bias gives what
    the explicit mask gives, grouped query heads included."""
    from nexusquant.attention import _causal, _lower_right_causal_attention, _masked_attention

    g = torch.Generator().manual_seed(9)
    q, t = 7, 30
    query = torch.randn(2, 6, q, 16, generator=g)  # 6 query heads over 2 KV heads
    key, value = torch.randn(2, 2, t, 16, generator=g), torch.randn(2, 2, t, 16, generator=g)
    got = _lower_right_causal_attention(query, key, value, 0.3, 0.0)
    ref = _masked_attention(query, key, value, _causal(q, t, query.device), 0.3, None, 0.0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "mistral"])
@torch.no_grad()
def test_unpadded_chunks_attend_without_a_mask(family, monkeypatch):
    """Where the chunk's mask would be plain causality (no padding, nothing evicted, no sliding
    window, no soft-cap), the chunk attends through the lower-right causal bias, and the logits
    stay the uncompressed model's; a padded batch keeps the masked path."""
    import nexusquant.attention as attention

    monkeypatch.setattr(attention, "_MASK_FREE_DEVICES", ("cpu",))
    taken = []
    real = attention._lower_right_causal_attention

    def counting(*args):
        taken.append(1)
        return real(*args)

    monkeypatch.setattr(attention, "_lower_right_causal_attention", counting)
    model = make_tiny(family)
    ids = _ids(120, seed=8, batch=2)
    ref = model(ids).logits
    with nq.nexusquant_evict(model, chunk_size=40, **EXACT):
        got = model(ids, use_cache=True).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # Gemma-2 soft-caps its logits and Mistral's layers slide: those keep the mask.
    assert bool(taken) == (family in ("llama", "qwen3"))
    taken.clear()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with nq.nexusquant_evict(model, chunk_size=40, **EXACT):
        model(ids, attention_mask=mask, use_cache=True)
    assert not taken


@pytest.mark.gpu
@torch.no_grad()
def test_unpadded_chunks_on_cuda_match_the_masked_path(monkeypatch):
    """On CUDA (flash or memory-efficient kernels under the causal bias) the chunked prefill's
    logits and compressed cache match those of the masked path."""
    import nexusquant.attention as attention

    model = make_tiny("qwen3", dtype=torch.bfloat16).cuda()
    ids = _ids(300, seed=10).cuda()
    runs = []
    for devices in (("cuda",), ()):
        monkeypatch.setattr(attention, "_MASK_FREE_DEVICES", devices)
        with nq.nexusquant_evict(model, quality="balanced", chunk_size=64) as session:
            logits = model(ids, use_cache=True).logits.float()
        runs.append((logits, nq.compression_stats(session.cache)["nbytes"]))
    (fast, fast_bytes), (masked, masked_bytes) = runs
    assert fast_bytes == masked_bytes
    scale = float(masked.abs().max())
    torch.testing.assert_close(fast, masked, atol=3e-2 * scale, rtol=0)


@torch.no_grad()
def test_chunks_by_hand_under_sdpa_hold_the_previous_chunk():
    """Under SDPA the cache compresses when the next forward starts (catch_up): during a chunked
    prefill it keeps the previous chunk exact for the chunk about to run, and after the prefill
    it compresses down to the recent window at the next forward."""
    model = make_tiny("llama")
    ids = _ids(200, seed=7)
    cache = NexusQuantCache(model, preset=nq.E8_PRESETS["balanced"], recent_window=8)  # it evicts
    nq.prefill(model, ids[:, :192], cache, chunk_size=64)
    layer = cache.layers[0]
    # The last chunk's forward ran; the one before it was compressed at its start down to one chunk.
    assert layer.window_len == 64 + 64
    assert layer.fine.length > 0 and layer.dropped > 0
    model(ids[:, 192:193], **with_cache(model, cache), use_cache=True)
    assert layer.window_len == 8 + 1  # caught up: the prompt's last chunk compressed too


@torch.no_grad()
def test_chunked_transform_coder_pays_its_basis_over_the_whole_prompt():
    """The transform coder fits its basis on the first chunk; its budget spreads the basis over the
    whole prompt, as a one-shot prefill does, not over the first chunk: otherwise a long prompt
    prefilled in chunks would hold fewer code bits per key than the same prompt in one piece."""
    from nexusquant.transform import fit_key_transform

    model = make_tiny("llama")
    ids = _ids(1200, seed=5)
    knobs = dict(quality="high", key_codec="pca", key_domain="pre_rope", key_rate=2.0, recent_window=8)
    kept = {}
    for chunk in (None, 200):
        with nq.nexusquant_evict(model, chunk_size=chunk, **knobs) as session:
            model(ids, use_cache=True)
        code = session.cache.layers[0].tiers["fine"].keys.rows[0][0]
        kept[chunk] = code.bits.shape[0]
    # The first chunk's keys alone, budgeted as if the basis were paid by them: fewer components.
    x = torch.randn(200, kept[None] * 4)
    assert fit_key_transform(x, 2.0, amortize_tokens=1200).bits.shape[0] > fit_key_transform(x, 2.0).bits.shape[0]
    # Chunked and one-shot keep components in the same range (the fits see different keys).
    assert kept[200] >= 0.9 * kept[None]  # 60 and 63 components; 48 when the first chunk paid for the basis


@torch.no_grad()
def test_chunked_prefill_weighs_the_first_chunks_fit_by_attention():
    """With ``key_attention_share`` the basis (fitted on the first chunk) is weighted by what that
    chunk's last queries read, as a one-shot prefill's is by the prompt's last queries."""
    model = make_tiny("llama")
    ids = _ids(600, seed=9)
    codes = {}
    for share in (0.0, 0.5):
        knobs = dict(quality="balanced", key_codec="pca", key_rate=2.0, recent_window=8, key_attention_share=share)
        with nq.nexusquant_evict(model, chunk_size=200, **knobs) as session:
            logits = model(ids, use_cache=True).logits
        assert torch.isfinite(logits).all()
        codes[share] = session.cache.layers[0].tiers["fine"].keys.rows[0][0]
    a, b = codes[0.0], codes[0.5]
    assert not (a.basis.shape == b.basis.shape and torch.equal(a.basis, b.basis)), "the weights moved the basis"


@torch.no_grad()
def test_chunked_prefill_stages_the_prompt_and_codes_it_again(monkeypatch):
    """``recode_prompt`` (the default): a transform-coded layer holds the chunks at the staging rates
    while the prompt is read, then codes the whole prompt once at the settings' rates, in one basis
    fitted on all of it, holding what a one-shot prefill holds; without it, each chunk is coded at
    the settings' rates in the first chunk's basis."""
    from nexusquant.cache import STAGING_VALUE_BITS

    staged = []
    unstage = NexusQuantLayer._unstage

    def spy(layer, attention):
        fine = layer.tiers["fine"]
        staged.append((fine.keys.rate, fine.values.bits, fine.length))
        return unstage(layer, attention)

    monkeypatch.setattr(NexusQuantLayer, "_unstage", spy)
    model = make_tiny("llama")
    ids = _ids(1200, seed=5)
    knobs = dict(quality="max", recent_window=8)
    caches = {}
    for chunk, recode in ((None, True), (200, True), (200, False)):
        staged.clear()
        with nq.nexusquant_evict(model, chunk_size=chunk, recode_prompt=recode, **knobs) as session:
            model(ids, use_cache=True)
        caches[chunk, recode] = session.cache
        layers = model.config.num_hidden_layers
        if chunk is not None and recode:
            # Every layer staged four chunks but the 4 sinks (the fifth is held exact while the
            # sixth, the last, runs) at the staging rates.
            assert staged == [(STAGING_KEY_RATE, STAGING_VALUE_BITS, 800 - 4)] * layers
        else:
            assert staged == []
    settings = nq.PRESETS["max"]
    one_shot = caches[None, True]
    for key in ((200, True), (200, False)):
        for layer, ref in zip(caches[key].layers, one_shot.layers):
            fine = layer.tiers["fine"]
            assert not layer.staged and layer.query_moment is None
            assert fine.keys.rate == settings.key_rate and fine.values.bits == settings.value_bits
            assert fine.length == ref.tiers["fine"].length
            # Recoded: one code per row, as one forward makes; otherwise one per chunk.
            assert len(fine.keys.rows[0]) == (1 if key[1] else 5)
    # The same bytes as one forward over the prompt (the bases differ a little, so the number of
    # components may too).
    held = {key: nq.compression_stats(cache)["nbytes"] for key, cache in caches.items()}
    assert abs(held[200, True] - held[None, True]) <= 0.02 * held[None, True]
    # Recoded, keys and values are centred on the whole prompt's mean, as one forward centres
    # them; otherwise on the first chunk's.
    for layer, plain, ref in zip(caches[200, True].layers, caches[200, False].layers, one_shot.layers):
        for name in ("k_center", "v_center"):
            recoded_gap = (getattr(layer, name) - getattr(ref, name)).float().norm()
            first_chunk_gap = (getattr(plain, name) - getattr(ref, name)).float().norm()
            assert recoded_gap < 0.25 * first_chunk_gap, name


@torch.no_grad()
def test_recoded_prompt_is_weighted_by_the_last_queries_over_the_whole_prompt():
    """With ``key_attention_share`` a recoded prompt's basis is fitted with the attention the last
    chunk's last queries pay every token, the staged ones included, as one forward's is."""
    model = make_tiny("llama")
    ids = _ids(600, seed=9)
    bases = {}
    for share in (0.0, 0.5):
        with nq.nexusquant_evict(model, quality="max", chunk_size=200, recent_window=8, key_attention_share=share) as s:
            assert torch.isfinite(model(ids, use_cache=True).logits).all()
        code = s.cache.layers[0].tiers["fine"].keys.rows[0]
        assert len(code) == 1
        bases[share] = code[0].basis
    a, b = bases[0.0], bases[0.5]
    assert not (a.shape == b.shape and torch.equal(a, b)), "the weights moved the basis"


@torch.no_grad()
def test_high_is_not_staged():
    """`high` codes at or above the rates below which chunks are staged: each chunk goes straight
    to its code, nothing is held at other rates."""
    model = make_tiny("llama")
    cache = NexusQuantCache(model, preset="high", recent_window=8)
    with nq.nexusquant_evict(model):
        nq.prefill(model, _ids(700, seed=4), cache, chunk_size=200)
        for layer in cache.layers:
            assert not layer.staged and layer.tiers["fine"].keys.rate == nq.PRESETS["high"].key_rate
            assert layer.tiers["fine"].length > 0


@torch.no_grad()
def test_prefill_by_hand_under_sdpa_codes_the_staged_prompt_at_the_first_decode_step():
    """Under SDPA a layer compresses at the start of the next forward: the staged prompt is coded
    again when the first decode step catches up with the prompt's last chunk."""
    model = make_tiny("llama")  # SDPA attention
    ids = _ids(700, seed=3)
    cache = NexusQuantCache(model, preset="max", recent_window=8)
    nq.prefill(model, ids, cache, chunk_size=200)
    layer = cache.layers[0]
    assert layer.staged and layer.tiers["fine"].keys.rate == STAGING_KEY_RATE
    out = model(ids[:, -1:], **with_cache(model, cache), use_cache=True)
    assert torch.isfinite(out.logits).all()
    assert not layer.staged and layer.tiers["fine"].keys.rate == 1.5
    assert layer.tiers["fine"].length == 700 - 4 - 8  # all but the sinks and the recent window


def test_recode_prompt_is_checked():
    model = make_tiny("llama")
    for bad in (1, "yes", None):
        with pytest.raises(nq.NexusQuantError, match="recode_prompt"):
            with nq.nexusquant_evict(model, chunk_size=64, recode_prompt=bad):
                pass
        with pytest.raises(nq.NexusQuantError, match="recode_prompt"):
            nq.prefill(model, _ids(80), NexusQuantCache(model), chunk_size=64, recode_prompt=bad)
    with pytest.raises(nq.NexusQuantError, match="recode_prompt"):
        from nexusquant.eval.methods import parse_variant

        parse_variant("max:chunk_size=64,recode_prompt=2")


@torch.no_grad()
def test_chunks_coded_in_a_held_basis_let_its_factors_go_when_the_prompt_ends():
    """Each chunk is coded in the basis fitted on the first with the Gram matrix's LU factors
    held between chunks (counted in the cache's bytes); once the prompt is coded they are let go."""
    from nexusquant.tiers import TransformCodedKeys

    model = make_tiny("llama")
    ids = _ids(200, seed=12)
    held = []
    real = TransformCodedKeys.append

    def watching(self, *args, **kwargs):
        real(self, *args, **kwargs)
        held.append(any(row[0].analysis is not None for row in self.rows))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TransformCodedKeys, "append", watching)
        with nq.nexusquant_evict(model, quality="high", chunk_size=40) as session:
            model(ids, use_cache=True)
    assert any(held)  # between chunks
    for layer in session.cache.layers:
        for tier in layer.tiers.values():
            if isinstance(tier.keys, TransformCodedKeys):
                assert all(row[0].analysis is None for row in tier.keys.rows)


def test_a_chunks_compression_reads_back_from_the_device_twice(monkeypatch):
    """Every read of a tensor's value on the host (``item``, ``bool``, ``tolist``, ``torch.equal``,
    ...) waits for a GPU to finish its queue. A chunk's compression makes two in its own
    bookkeeping (the finiteness check, then one read of the tier decision), whatever the number
    of tiers: read one at a time they were 17 (3,784 waits in a 64K-token prefill, docs/GPU.md).
    Counted on the CPU, where the same calls run; the transform coder's fit (its allocation is
    computed on the host) and the first compression's sinks are not counted."""
    import traceback

    reads = []
    compressions = []
    real_compress = NexusQuantLayer.compress

    def counting_compress(self, *args, **kwargs):
        compressions.append(len(reads))
        return real_compress(self, *args, **kwargs)

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(*args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.endswith(("nexusquant/cache.py", "nexusquant/tiers.py")):
                reads.append((caller.lineno, caller.line))
            return real(*args, **kwargs)

        return read

    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(NexusQuantLayer, "compress", counting_compress)
    model = make_tiny("llama")
    ids = _ids(260, seed=5)
    with nq.nexusquant_evict(model, quality="balanced", chunk_size=64), torch.no_grad():
        model(ids, use_cache=True)
    layers = model.config.num_hidden_layers
    assert len(compressions) == 5 * layers  # 260 tokens in chunks of 64
    compressions.append(len(reads))
    per_call = [b - a for a, b in zip(compressions, compressions[1:])]
    # Chunk by chunk, layer by layer: the first chunk is held whole (nothing to compress), the
    # second's compression also picks the sinks, the last joins the staged prompt (one more read).
    middle, last = per_call[2 * layers : -layers], per_call[-layers:]
    assert middle and max(middle) <= 2, reads
    assert max(last) <= 3, reads


@pytest.mark.gpu
@torch.no_grad()
def test_chunk_attention_on_cuda_takes_the_grouped_heads_in_one_call(monkeypatch):
    """On CUDA a chunk's lower-right causal attention over grouped KV heads is one flash call
    (keys and values read once per group, not once per query head), and gives what the explicit
    mask gives."""
    import nexusquant.attention as attention
    from nexusquant.attention import _causal, _lower_right_causal_attention, _masked_attention

    g = torch.Generator(device="cuda").manual_seed(11)
    q, t = 192, 1000
    query = torch.randn(2, 32, q, 128, generator=g, device="cuda", dtype=torch.bfloat16)  # 32 over 8
    key = torch.randn(2, 8, t, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    value = torch.randn(2, 8, t, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    assert attention._flash_takes_grouped_heads(query, key, value, 0.0)
    per_head = []
    real = attention._attention_per_query_head
    monkeypatch.setattr(attention, "_attention_per_query_head", lambda *a: per_head.append(1) or real(*a))
    got = _lower_right_causal_attention(query, key, value, 128**-0.5, 0.0)
    assert not per_head
    ref = _masked_attention(
        query.float(), key.float(), value.float(), _causal(q, t, query.device), 128**-0.5, None, 0.0
    )
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
