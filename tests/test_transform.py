"""The transform coder for keys (nexusquant.transform) and the cache running on it."""

from __future__ import annotations

import copy

import pytest
import torch

from nexusquant.compat import with_cache
from nexusquant.transform import GAUSSIAN_MSE, allocate_bits, fit_key_transform, pack_fixed, unpack_fixed


@pytest.mark.parametrize("widths", [[1], [8], [3, 5, 1, 8, 2], [1] * 13, [7, 7, 7], list(range(1, 9)) * 3])
def test_pack_round_trip(widths):
    g = torch.Generator().manual_seed(len(widths))
    bits = torch.tensor(widths, dtype=torch.uint8)
    q = torch.stack([torch.randint(0, 2**w, (37,), generator=g) for w in widths], 1)
    packed = pack_fixed(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (37, (sum(widths) + 7) // 8)
    assert torch.equal(unpack_fixed(packed, bits), q)


def test_pack_is_lsb_first_at_fixed_offsets():
    # widths 3 and 6: token value (5, 33) -> bits 101 then 100001 -> byte0 = 0b00001_101 | ..., LSB first
    packed = pack_fixed(torch.tensor([[5, 33]]), torch.tensor([3, 6], dtype=torch.uint8))
    assert packed.tolist() == [[(5 | (33 << 3)) & 0xFF, (33 << 3) >> 8]]


def test_allocation_spends_the_budget_and_follows_the_variances():
    var = torch.tensor([16.0, 4.0, 1.0, 0.25, 0.0, 0.0])
    for total in (0, 1, 5, 12, 20, 48):
        bits = allocate_bits(var, total)
        assert int(bits.sum()) == total
        assert bool((bits >= 0).all() and (bits <= 8).all())
        assert bool((bits[:-1] >= bits[1:]).all()), "a larger variance never gets fewer bits"
    bits = allocate_bits(var, 6)
    assert bits[4:].sum() == 0, "components without variance cost nothing"

    # Each bit goes where it removes the most error: no single move of one bit lowers the total.
    def err(b):
        return sum(float(v) * GAUSSIAN_MSE[int(x)] for v, x in zip(var, b))

    base = err(bits)
    for i in range(6):
        for j in range(6):
            if i != j and bits[i] > 0 and bits[j] < 8:
                moved = bits.clone()
                moved[i] -= 1
                moved[j] += 1
                assert err(moved) >= base - 1e-12


def test_lagrangian_allocation_spends_where_a_bit_buys_more_than_it_costs():
    from nexusquant.transform import _choose_components_lagrangian

    mse = torch.tensor(GAUSSIAN_MSE, dtype=torch.float64)
    weight = torch.tensor([100.0, 10.0, 1.0, 0.01])
    bits = _choose_components_lagrangian(weight, 0.5, side_bits_per_component=0.0)
    # every bit kept removes more than 0.5 of error, every bit left out would remove less
    for w, b in zip(weight.double(), bits):
        assert b == 0 or w * (mse[b - 1] - mse[b]) > 0.5
        assert b == len(GAUSSIAN_MSE) - 1 or w * (mse[b] - mse[b + 1]) <= 0.5
    assert bits.tolist()[-1] == 0 and bits[0] > bits[1] > bits[2]
    # a higher water level spends fewer bits; a component whose bits do not pay its basis is dropped
    assert int(_choose_components_lagrangian(weight, 5.0, 0.0).sum()) < int(bits.sum())
    assert _choose_components_lagrangian(weight, 0.5, side_bits_per_component=100.0)[2] == 0


def _choose_components_one_k_at_a_time(weight, bits_per_token, side_per_component, side_fixed):
    """The definition _choose_components computes for every K at once: allocate_bits on the first
    K components with what their side information leaves, least Gaussian-model error wins."""
    mse = torch.tensor(GAUSSIAN_MSE, dtype=torch.float64)
    w = weight.double().clamp(min=0)
    f, top = w.shape[0], len(GAUSSIAN_MSE) - 1
    best, best_err = torch.zeros(f, dtype=torch.int64), float(w.sum())
    for k in range(1, f + 1):
        code_bits = int(bits_per_token - k * side_per_component - side_fixed)
        if code_bits < k:
            break
        bits = torch.zeros(f, dtype=torch.int64)
        bits[:k] = allocate_bits(w[:k], min(code_bits, k * top))
        if bool((bits[:k] == 0).any()):
            continue
        err = float((w * mse[bits]).sum())
        if err < best_err:
            best, best_err = bits, err
    return best


@pytest.mark.parametrize("f", [1, 7, 64, 300])
def test_component_choice_is_the_one_k_at_a_time_definition(f):
    from nexusquant.transform import _choose_components

    g = torch.Generator().manual_seed(f)
    # eigenvalue-like spectra: a steep decay, a flat tail, and trailing zeros
    for weight in (
        torch.rand(f, generator=g).pow(6).sort(descending=True).values,
        torch.cat([torch.linspace(5, 1, f - f // 3), torch.zeros(f // 3)]),
    ):
        for per_token, side_per, side_fixed in (
            (2.0 * f, 0.5, 3.0),
            (0.6 * f, 0.1, 0.0),
            (9.0 * f, 2.0, 40.0),
            (3, 5, 0),
        ):
            got = _choose_components(weight, per_token, side_per, side_fixed)
            ref = _choose_components_one_k_at_a_time(weight, per_token, side_per, side_fixed)
            assert torch.equal(got, ref), (per_token, side_per, side_fixed)


def test_low_rank_keys_cost_few_bits():
    g = torch.Generator().manual_seed(0)
    t, f, r = 800, 96, 8
    basis = torch.linalg.qr(torch.randn(f, r, generator=g))[0]
    x = torch.randn(t, r, generator=g) * torch.linspace(4, 1, r) @ basis.T + 3.0 + 0.01 * torch.randn(t, f, generator=g)
    code = fit_key_transform(x, 0.5)
    assert code.basis.shape[1] <= r + 2, "only the components that carry variance are kept"
    rel = ((code.decode() - x) ** 2).mean() / x.var(0).sum() * f
    assert rel < 0.02
    # the budget pays for everything held (codes rounded up to whole bytes per token)
    assert 8 * code.nbytes() <= (0.5 * f + 8) * t
    assert code.nbytes() == sum(getattr(code, n).numel() * getattr(code, n).element_size() for n in code._FIELDS)


def test_more_bits_less_error_and_encode_more_matches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)
    errs = []
    for rate in (0.5, 1.0, 2.0, 4.0):
        code = fit_key_transform(x, rate)
        errs.append(float(((code.decode() - x) ** 2).mean()))
        more = code.encode_more(x[:50])
        assert torch.equal(more.codes, code.codes[:50]), "a later block is coded exactly as the prompt was"
        assert more.basis is code.basis
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.05 * errs[0]


def test_blocks_of_tokens_code_as_one_pass_does(monkeypatch):
    """A long prompt is fitted and coded a block of tokens at a time (bounded working memory):
    the blocks change float rounding in the fit, not what the code costs or how well it codes."""
    import nexusquant.transform as transform

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(1000, 8, generator=g) @ torch.randn(8, 64, generator=g)).to(torch.bfloat16)
    x = x + 0.1 * torch.randn(1000, 64, generator=g).to(torch.bfloat16)
    valid = torch.rand(1000, generator=g) > 0.1
    metric = torch.randn(64, 64, generator=g)
    metric = metric @ metric.T
    one = fit_key_transform(x, 2.0, valid, query_moment=metric)
    monkeypatch.setattr(transform, "_ROW_BLOCK", 37)  # 28 blocks, the last one short
    blocks = fit_key_transform(x, 2.0, valid, query_moment=metric)
    assert torch.equal(one.bits, blocks.bits) and one.codes.shape == blocks.codes.shape
    assert torch.equal(one.mean, blocks.mean)
    err_one = float((one.decode() - x.float())[valid].pow(2).mean())
    err_blocks = float((blocks.decode() - x.float())[valid].pow(2).mean())
    assert abs(err_blocks - err_one) < 0.02 * err_one
    # Decoding and coding more tokens are row by row: blocks change nothing there.
    decoded = blocks.decode()
    monkeypatch.setattr(transform, "_ROW_BLOCK", 1 << 20)
    assert torch.allclose(blocks.decode(), decoded, atol=1e-6)
    assert torch.equal(blocks.encode_more(x[:300]).codes, blocks.codes[:300])


def test_fit_ignores_invalid_tokens():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(800, 32, generator=g)
    junk = x.clone()
    junk[650:] = 1e4  # padding slots full of garbage
    valid = torch.ones(800, dtype=torch.bool)
    valid[650:] = False
    a = fit_key_transform(junk, 2.0, valid)
    b = fit_key_transform(x[:650], 2.0)
    assert torch.allclose(a.decode()[:650], b.decode(), atol=1e-4)


def test_token_weights_move_the_error_to_the_light_tokens():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(900, 32, generator=g) * torch.linspace(2, 0.2, 32)
    heavy = torch.zeros(900, dtype=torch.bool)
    heavy[::9] = True  # the tokens the queries read
    weight = torch.where(heavy, 5.0, 0.5)
    weight = weight / weight.mean()
    even, weighted = fit_key_transform(x, 1.5), fit_key_transform(x, 1.5, weight)

    def err(code, sel):
        return float((code.decode() - x)[sel].pow(2).mean())

    assert err(weighted, heavy) < 0.9 * err(even, heavy)
    assert err(weighted, ~heavy) > err(even, ~heavy)
    # Zero weight is the same as an invalid token.
    zero = torch.where(heavy, 0.0, 1.0)
    a, b = fit_key_transform(x, 2.0, zero), fit_key_transform(x, 2.0, ~heavy)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.basis, b.basis)


def test_short_prompts_keep_enough_components():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 64, generator=g) * torch.linspace(3, 0.1, 64)
    short, at_floor = fit_key_transform(x[:64], 2.0), fit_key_transform(x[:512], 2.0)
    assert short.basis.shape[1] >= 0.8 * at_floor.basis.shape[1] > 10, "the basis is paid as if 512 tokens shared it"


# ---------------------------------------------------------------- the cache on a tiny model
@pytest.fixture(scope="module")
def tiny():
    from tiny_models import make_tiny

    return make_tiny("llama")


def test_cache_with_transform_coded_keys(tiny):
    import nexusquant as nq

    torch.manual_seed(0)
    ids = torch.randint(0, 90, (1, 200))
    with torch.no_grad():
        ref = tiny(ids).logits[0, -1]
        with nq.nexusquant_evict(tiny, quality="high", key_codec="pca", key_rate=8.0) as s:
            cache = nq.NexusQuantCache(tiny, preset=s.settings)
            tiny(ids[:, :-1], **with_cache(tiny, cache))
            last = tiny(ids[:, -1:], **with_cache(tiny, cache)).logits[0, -1]
    layer = cache.layers[0]
    assert layer.fine.keys.codec is None and layer.fine.length > 150
    stats = cache.compression_stats()
    assert stats["ratio"] > 1.2  # fp32 model, 200 tokens: the basis (128 x kept components) is most of the bytes
    assert torch.allclose(last, ref, atol=0.15 * float(ref.abs().max())), "generous transform codes stay close"
    # deep copies are independent
    dup = copy.deepcopy(cache)
    assert dup.nbytes() == cache.nbytes()


def test_transform_keys_with_eviction_keep_heads_alike(tiny):
    import nexusquant as nq

    torch.manual_seed(1)
    ids = torch.randint(0, 90, (2, 160))
    with torch.no_grad(), nq.nexusquant_evict(tiny, quality="balanced", key_codec="pca", key_rate=2.0, evict=0.5) as s:
        cache = nq.NexusQuantCache(tiny, preset=s.settings, record_positions=True)
        tiny(ids, **with_cache(tiny, cache))
    for layer in cache.layers:
        seq = layer.fine.seq
        assert seq is not None and bool((seq == seq[:, :1]).all()), "every KV head keeps the same tokens"
        assert layer.dropped > 0


def test_attention_share_weights_the_fit_by_what_the_last_queries_read(tiny, monkeypatch):
    import nexusquant as nq
    import nexusquant.tiers as tiers

    seen = []

    def spy(x, rate, valid=None, *args, **kwargs):
        seen.append(None if valid is None else valid.clone())
        return fit_key_transform(x, rate, valid, *args, **kwargs)

    monkeypatch.setattr(tiers, "fit_key_transform", spy)
    torch.manual_seed(3)
    ids = torch.randint(1, 90, (2, 150))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0  # row 1 is left-padded
    fits = {}
    for share in (0.0, 0.5):
        seen.clear()
        knobs = dict(quality="balanced", key_codec="pca", key_rate=2.0, key_attention_share=share, recent_window=8)
        with torch.no_grad(), nq.nexusquant_evict(tiny, **knobs) as s:
            cache = nq.NexusQuantCache(tiny, preset=s.settings)
            tiny(ids, attention_mask=mask, **with_cache(tiny, cache))
        fits[share] = list(seen)
        assert all(layer.dropped == 0 for layer in cache.layers), "weighting evicts nothing"
    n_fits = len(tiny.model.layers) * 2  # one basis per layer and batch row
    assert len(fits[0.0]) == len(fits[0.5]) == n_fits
    for w in fits[0.0]:
        assert w is None or w.dtype == torch.bool, "share 0: every real token alike"
    for i, w in enumerate(fits[0.5]):
        assert w is not None and w.dtype == torch.float32
        real = w > 0
        assert int(real.sum()) == (150 - 8 - 4 if i % 2 == 0 else 150 - 30 - 8 - 4), "padding weighs nothing"
        assert float(w[real].mean()) == pytest.approx(1.0, rel=1e-4)
        assert float(w[real].min()) >= 0.5 - 1e-6, "half of every token's weight stays even"
        assert float(w[real].max() - w[real].min()) > 0.05, (
            "tokens weigh what the queries read (a random model reads nearly evenly)"
        )


@pytest.mark.parametrize("domain", ["post_rope", "pre_rope"])
def test_query_metric_is_fitted_in_the_keys_domain(tiny, domain):
    import nexusquant as nq

    torch.manual_seed(2)
    ids = torch.randint(0, 90, (1, 120))
    knobs = dict(quality="high", key_codec="pca", key_rate=8.0, key_domain=domain)
    with torch.no_grad(), nq.nexusquant_evict(tiny, **knobs) as s:
        cache = nq.NexusQuantCache(tiny, preset=s.settings)
        seen = []
        orig = type(cache.layers[0]).observe_queries

        def spy(layer, query):
            orig(layer, query)
            seen.append(layer.query_moment)

        type(cache.layers[0]).observe_queries = spy
        try:
            logits = tiny(ids, **with_cache(tiny, cache)).logits
        finally:
            type(cache.layers[0]).observe_queries = orig
        ref = tiny(ids).logits
    assert len(seen) == len(cache.layers) and all(m is not None for m in seen)
    m = seen[0][0]
    d = tiny.config.head_dim
    assert torch.allclose(m, m.T, atol=1e-5) and float(m[:d, d:].abs().max()) == 0.0, "block diagonal over KV heads"
    assert all(layer.query_moment is None for layer in cache.layers), "the metric is dropped once the basis is fitted"
    assert torch.allclose(logits, ref, atol=1e-4), "the prefill itself attends to the full-precision prompt"


def test_transform_coded_cache_file_round_trip(tiny, tmp_path):
    import nexusquant as nq

    torch.manual_seed(3)
    ids = torch.randint(0, 90, (2, 150))
    nxt = torch.randint(0, 90, (2, 1))
    knobs = dict(quality="balanced", key_codec="pca", key_rate=3.0, key_domain="pre_rope")
    with torch.no_grad(), nq.nexusquant_evict(tiny, **knobs) as s:
        cache = nq.NexusQuantCache(tiny, preset=s.settings)
        tiny(ids, **with_cache(tiny, cache))
        info = nq.save_cache(cache, tmp_path / "c.nqkv", token_ids=ids)
        loaded = nq.load_cache(tmp_path / "c.nqkv", tiny)
        a = tiny(nxt, **with_cache(tiny, cache)).logits
        b = tiny(nxt, **with_cache(tiny, loaded)).logits
    assert torch.equal(a, b)
    assert loaded.nbytes() == cache.nbytes() and info["file_bytes"] > 0
    layer = loaded.layers[0]
    assert (
        isinstance(layer.fine.keys.rows[0][0].basis, torch.Tensor)
        and layer.fine.keys.rows[0][0].basis.dtype == torch.int8
    )


@pytest.mark.parametrize("domain", ["post_rope", "pre_rope"])
def test_generated_blocks_of_transform_coded_layers_get_e8_codes(tiny, tmp_path, domain):
    """Generated tokens are not coded in the prompt's basis (it does not cover them, docs/EVAL.md):
    they go to the generated tier as E8 codes; the fine tier keeps the prompt; files carry both."""
    import nexusquant as nq

    torch.manual_seed(4)
    ids = torch.randint(0, 90, (1, 130))
    knobs = dict(quality="high", key_codec="pca", key_rate=3.0, key_domain=domain, recent_window=8, block=8)
    with torch.no_grad(), nq.nexusquant_evict(tiny, **knobs) as s:
        cache = nq.NexusQuantCache(tiny, preset=s.settings)
        tiny(ids[:, :100], **with_cache(tiny, cache))
        prompt_fine = cache.layers[0].fine.length
        for i in range(100, 125):
            tiny(ids[:, i : i + 1], **with_cache(tiny, cache))
        layer = cache.layers[0]
        assert layer.fine.length == prompt_fine, "the fine tier holds the prompt only"
        gen = layer.tiers["generated"]
        # 8 prompt tokens left in the window + 25 generated, compressed 8 at a time, 8 kept exact
        assert gen.length == 24 and gen.keys.codec is not None and gen.keys.bits == s.settings.key_bits
        assert nq.compression_stats(cache)["layers"][0]["generated"] == 24
        nq.save_cache(cache, tmp_path / "g.nqkv")
        loaded = nq.load_cache(tmp_path / "g.nqkv", tiny)
        a = tiny(ids[:, 125:126], **with_cache(tiny, cache)).logits
        b = tiny(ids[:, 125:126], **with_cache(tiny, loaded)).logits
        ref = tiny(ids[:, :126]).logits[:, -1:]
    assert torch.equal(a, b)
    assert loaded.layers[0].tiers["generated"].length == 24
    assert torch.allclose(a, ref, atol=0.2 * float(ref.abs().max()))


def test_e8_layers_never_use_the_generated_tier(tiny):
    import nexusquant as nq

    ids = torch.randint(0, 90, (1, 120))
    with torch.no_grad(), nq.nexusquant_evict(tiny, quality=nq.E8_PRESETS["high"], recent_window=8, block=8) as s:
        out = tiny.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert out.shape[1] == 140
        assert all(layer.tiers["generated"].length == 0 for layer in s.cache.layers)


@pytest.mark.parametrize("field,bad", [("bits", "width9"), ("step", "negative"), ("codes", "short"), ("basis", "wide")])
def test_transform_arrays_are_validated(field, bad):
    import numpy as np

    from nexusquant import NexusQuantError
    from nexusquant.files import _array, _restore_transform, _transform_arrays
    from nexusquant.tiers import TransformCodedKeys

    keys = TransformCodedKeys(16, 2.0, torch.float32)
    keys.append(torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(4)))
    arrays = _transform_arrays("fine.k.tc", keys.rows)
    p = f"fine.k.tc.0.{field}"
    if bad == "width9":
        arrays[p] = arrays[p].copy()
        arrays[p][0] = 9
    elif bad == "negative":
        arrays[p] = -arrays[p]
    elif bad == "short":
        arrays[p] = arrays[p][:-1]
    else:
        arrays[p] = np.zeros((32, arrays[p].shape[1] + 1), dtype=np.int8)

    def need(name, shape, dtypes):
        return _array(arrays, name, shape, dtypes, "layer 0")

    with pytest.raises(NexusQuantError):
        _restore_transform(arrays, "fine.k.tc", 1, 32, 40, need, "layer 0", "cpu")
    good = _transform_arrays("fine.k.tc", keys.rows)
    rows = _restore_transform(good, "fine.k.tc", 1, 32, 40, lambda n, s, d: _array(good, n, s, d, "x"), "x", "cpu")
    assert torch.equal(rows[0][0].decode(), keys.rows[0][0].decode())


def test_sliding_layers_keep_e8_keys():
    from tiny_models import make_tiny

    import nexusquant as nq
    from nexusquant.tiers import QuantizedTensor

    model = make_tiny("mistral")  # every layer slides over 48 tokens
    ids = torch.randint(0, 90, (1, 120), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), nq.nexusquant_evict(model, quality="high", key_codec="pca") as s:
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out.shape[1] == 140
    assert all(isinstance(layer.fine.keys, QuantizedTensor) for layer in s.cache.layers)


PCA_KNOBS = {"key_codec": "pca", "key_domain": "pre_rope", "key_rate": 1.5}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"key_attention_share": 0.5},
        {"value_refine_share": 0.25},  # refined values: CUDA decode dequantizes them
        {"value_refine_share": 0.25, "key_codec": "e8", "key_domain": "post_rope"},
    ],
)
def test_transform_coded_cache_on_cuda_matches_cpu(extra):
    from tiny_models import make_tiny

    import nexusquant as nq

    ids = torch.randint(0, 90, (2, 300), generator=torch.Generator().manual_seed(7))
    logits = {}
    for device in ("cpu", "cuda"):
        model = make_tiny("llama").to(device)
        knobs = dict(PCA_KNOBS, **extra)
        with torch.no_grad(), nq.nexusquant_evict(model, quality="balanced", **knobs) as s:
            cache = nq.NexusQuantCache(model, preset=s.settings)
            model(ids[:, :-8].to(device), **with_cache(model, cache))
            steps = [
                model(ids[:, i : i + 1].to(device), **with_cache(model, cache)).logits[:, -1] for i in range(292, 300)
            ]
        logits[device] = torch.stack(steps).float().cpu()
    # Same codes up to float rounding of the basis fit on another device: the logits stay close.
    assert torch.allclose(logits["cuda"], logits["cpu"], atol=0.05 * float(logits["cpu"].abs().max()))


def test_coefficients_from_held_factors_are_the_solve_to_the_bit():
    """A basis's Gram matrix is factored by the first encode_more and its factors reused for every
    later block of keys: the coefficients are torch.linalg.solve's, bit for bit, and a code read
    back from a file (no factors) makes the same ones."""
    from nexusquant.transform import _coefficients, _gram_lu

    g = torch.Generator().manual_seed(5)
    synth, x, mean = torch.randn(64, 10, generator=g), torch.randn(300, 64, generator=g), torch.randn(64, generator=g)
    ref = torch.linalg.solve(synth.T @ synth, synth.T @ (x - mean).T).T
    assert torch.equal(_coefficients(x, mean, synth), ref)
    assert torch.equal(_coefficients(x, mean, synth, _gram_lu(synth)), ref)

    keys = torch.randn(200, 64, generator=g) @ torch.randn(64, 64, generator=g)
    code = fit_key_transform(keys[:150], 3.0)
    assert code.analysis is None
    bare = code.nbytes()
    more = code.encode_more(keys[140:170])
    # the first code of a row holds the factors (and counts them); its appends do not
    assert code.analysis is not None and more.analysis is None
    k = code.basis.shape[1]
    assert code.nbytes() == bare + 4 * k * k + 4 * k
    held = code.analysis
    again = code.encode_more(keys[170:])
    assert code.analysis is held
    read_back = copy.copy(code)
    read_back.analysis = None
    assert torch.equal(read_back.encode_more(keys[170:]).codes, again.codes)
    # coding the first tokens again in the fitted basis gives the fit's own codes
    assert torch.equal(more.codes[:10], code.codes[140:150])
