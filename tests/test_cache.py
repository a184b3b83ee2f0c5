"""The compressed cache on tiny random models of every supported family (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import FAMILIES, family_supported, make_tiny
from transformers import DynamicCache

import nexusquant as nq
from nexusquant.cache import NexusQuantLayer
from nexusquant.compat import output_cache, with_cache
from nexusquant.presets import resolve_settings

ALL = [f for f in FAMILIES if family_supported(f)]
# Families whose layers all use full attention: a pruned DynamicCache reproduces them exactly.
FULL_ATTENTION = [f for f in ["llama", "qwen2", "qwen3", "phi3", "gpt_neox", "gptj"] if f in ALL]
EXACT = dict(evict=0.0, demote=0.0, key_bits=16, value_bits=16, recent_window=8, block=8)


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, n), generator=g)


@torch.no_grad()
def reference_logits(model, prompt, cont):
    out = model(prompt, use_cache=True)
    out2 = model(cont, **with_cache(model, output_cache(out)), use_cache=True)
    return torch.cat([out.logits, out2.logits], dim=1)


@torch.no_grad()
def compressed_logits(model, prompt, cont, **knobs):
    """Prefill, then one forward per continuation token, as generate does."""
    with nq.nexusquant_evict(model, **knobs) as session:
        out = model(prompt, use_cache=True)
        cache = output_cache(out)
        logits = [out.logits]
        for i in range(cont.shape[1]):
            logits.append(model(cont[:, i : i + 1], **with_cache(model, cache), use_cache=True).logits)
        return torch.cat(logits, dim=1), cache, session.stats()


@pytest.mark.parametrize("family", ALL)
def test_without_eviction_and_quantization_logits_are_exact(family):
    model = make_tiny(family)
    ids = _ids(130)
    ref = reference_logits(model, ids[:, :100], ids[:, 100:])
    got, cache, stats = compressed_logits(model, ids[:, :100], ids[:, 100:], **EXACT)
    assert all(isinstance(layer, NexusQuantLayer) for layer in cache.layers)
    # Tokens really moved out of the window into the tiers during prefill and generation.
    assert sum(layer["fine"] for layer in stats["layers"]) > 0
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_generate_without_compression_matches(family):
    model = make_tiny(family)
    ids = _ids(60, seed=3)
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with nq.nexusquant_evict(model, **EXACT):
        got = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)


def _codec_rms_error(bits: int) -> float:
    """Relative RMS error of the codec on unit Gaussian vectors of dimension 64."""
    x = torch.randn(4000, 64)
    c = nq.E8Codec(64, bits)
    y = torch.from_numpy(c.decode(c.encode(x)))
    return math.sqrt(((y - x) ** 2).mean().item())


@pytest.mark.parametrize("family", [f for f in ["llama", "qwen2", "phi3", "gemma3", "gptj"] if f in ALL])
def test_quantization_error_follows_codec_distortion(family):
    model = make_tiny(family)
    ids = _ids(140, seed=1)
    prompt, cont = ids[:, :120], ids[:, 120:]
    ref_cache = DynamicCache()
    with torch.no_grad():
        model(prompt, **with_cache(model, ref_cache), use_cache=True)
    ref = reference_logits(model, prompt, cont)
    errs = {}
    for bits in (2, 4):
        knobs = dict(
            evict=0.0,
            demote=0.0,
            key_bits=bits,
            value_bits=bits,
            recent_window=8,
            center=False,
            key_codec="e8",
            key_domain="post_rope",
        )
        with nq.nexusquant_evict(model, **knobs):
            cache = DynamicCache()
            with torch.no_grad():
                model(prompt, **with_cache(model, cache), use_cache=True)
            bound = 1.6 * _codec_rms_error(bits)
            for li, layer in enumerate(cache.layers):
                comp_k, comp_v, _, _ = layer._compressed_parts()
                n_sink = 0 if layer.sink_k is None else layer.sink_k.shape[2]
                n = comp_k.shape[2] - n_sink
                rk, rv = ref_cache.layers[li].keys, ref_cache.layers[li].values
                start = n_sink if not layer.is_sliding else rk.shape[2] - layer.window_len - n
                true_k = rk[:, :, start : start + n]
                true_v = rv[:, :, start : start + n]
                for got_t, true_t in ((comp_k[:, :, n_sink:], true_k), (comp_v[:, :, n_sink:], true_v)):
                    rel = ((got_t - true_t).norm() / true_t.norm()).item()
                    assert rel < bound, f"layer {li}: relative error {rel:.4f} above {bound:.4f} at {bits} bits"
        got, _, _ = compressed_logits(model, prompt, cont, **knobs)
        errs[bits] = (got - ref).abs().mean().item()
    # Finer codes perturb the logits less, and even 2-bit codes stay far from scrambling attention
    # (which would move logits by about their own spread).
    spread = (ref - ref.mean(-1, keepdim=True)).abs().mean().item()
    assert errs[4] < errs[2] < 0.5 * spread


@pytest.mark.parametrize("family", FULL_ATTENTION)
def test_eviction_equals_an_explicitly_pruned_cache(family):
    """Evicted tokens are gone and kept ones keep their positions: the same as a DynamicCache that
    holds exactly the kept tokens (post-RoPE, as the model made them), fed the right positions."""
    model = make_tiny(family)
    ids = _ids(110, seed=2)
    prompt, cont = ids[:, :96], ids[:, 96:]
    knobs = dict(
        key_codec="e8",  # per-head selection: the transform coder keeps the same tokens in every head
        key_domain="post_rope",
        evict=0.5,
        demote=0.2,
        key_bits=16,
        value_bits=16,
        coarse_key_bits=16,
        coarse_value_bits=16,
        recent_window=8,
        block=64,
        sink_tokens=2,
    )
    cache = nq.NexusQuantCache(model.config, record_positions=True, **knobs)
    full = DynamicCache()
    with torch.no_grad():
        model(prompt, **with_cache(model, full), use_cache=True)
    with nq.nexusquant_evict(model, **knobs), torch.no_grad():
        model(prompt, **with_cache(model, cache), use_cache=True)
        # Build the pruned cache from the uncompressed keys at the kept positions.
        pruned = DynamicCache()
        for li, layer in enumerate(cache.layers):
            assert layer.dropped > 0
            _, _, seq, valid = layer._compressed_parts()
            assert valid is None
            win = torch.arange(layer.seen - layer.window_len, layer.seen)
            idx = torch.cat([seq.long(), win.expand(1, seq.shape[1], -1)], dim=2)
            k = torch.gather(full.layers[li].keys, 2, idx[..., None].expand(-1, -1, -1, layer.head_dim))
            v = torch.gather(full.layers[li].values, 2, idx[..., None].expand(-1, -1, -1, layer.head_dim))
            pruned.update(k, v, li)
        got, want = [], []
        for i in range(cont.shape[1]):
            pos = torch.tensor([[96 + i]])
            got.append(model(cont[:, i : i + 1], **with_cache(model, cache), use_cache=True).logits)
            want.append(model(cont[:, i : i + 1], **with_cache(model, pruned), position_ids=pos, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=2e-5, rtol=1e-5)
    # Different heads kept different tokens (per-head selection), and no position repeats.
    layer = cache.layers[0]
    _, _, seq, _ = layer._compressed_parts()
    if seq.shape[1] > 1:
        assert not torch.equal(seq[0, 0], seq[0, 1])
    for h in range(seq.shape[1]):
        assert seq[0, h].unique().numel() == seq.shape[2]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "gpt_neox"])
def test_left_padded_batch_equals_prompts_one_by_one(family):
    model = make_tiny(family)
    a, b = _ids(90, seed=5)[0], _ids(70, seed=6)[0]
    pad = 0
    batch = torch.full((2, 90), pad)
    batch[0] = a
    batch[1, 20:] = b
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, :20] = 0
    knobs = dict(evict=0.4, demote=0.2, key_bits=4, value_bits=4, recent_window=8, block=16)
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
    with nq.nexusquant_evict(model, **knobs):
        together = model.generate(batch, attention_mask=mask, **gen)
        alone = [model.generate(x[None], **gen) for x in (a, b)]
    for row in range(2):
        scores_together = torch.stack([s[row] for s in together.scores])
        scores_alone = torch.stack([s[0] for s in alone[row].scores])
        torch.testing.assert_close(scores_together, scores_alone, atol=2e-3, rtol=2e-3)
        assert torch.equal(together.sequences[row, 90:], alone[row].sequences[0, -10:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = make_tiny("llama", dtype=dtype)
    ids = _ids(100, seed=4)
    ref = reference_logits(model, ids[:, :80], ids[:, 80:])
    got, cache, stats = compressed_logits(model, ids[:, :80], ids[:, 80:], **EXACT)
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)
    got2, cache2, stats2 = compressed_logits(model, ids[:, :80], ids[:, 80:], quality="balanced", recent_window=8)
    assert torch.isfinite(got2).all()
    assert cache2.layers[0].win_k.dtype == dtype
    assert stats2["ratio"] > 1.5


def test_pre_rope_keys_undo_the_models_own_rotary_embedding():
    """Undoing RoPE on the cached keys gives exactly what k_proj produced (checked per family)."""
    for family in [f for f in ("llama", "phi3", "gpt_neox", "gptj", "gemma3") if f in ALL]:
        model = make_tiny(family)
        ids = _ids(90, seed=7)
        captured = {}

        def grab(mod, inp, out, store=captured):
            store["k"] = out.detach()

        attn = nq.evict.attention_modules(model)[0]
        proj = next(getattr(attn, n) for n in ("k_proj", "qkv_proj", "query_key_value") if hasattr(attn, n))
        handle = proj.register_forward_hook(grab)
        knobs = dict(evict=0.0, demote=0.0, key_bits=4, value_bits=4, recent_window=8, key_domain="pre_rope")
        try:
            with nq.nexusquant_evict(model, **knobs), torch.no_grad():
                cache = DynamicCache()
                model(ids, **with_cache(model, cache), use_cache=True)
        finally:
            handle.remove()
        layer = cache.layers[0]
        k_post = layer.win_k  # recent window: still post-RoPE, full precision
        seq = torch.arange(layer.seen - layer.window_len, layer.seen).expand(1, k_post.shape[1], -1)
        undone = layer._undo_rope(k_post, seq)
        raw = captured["k"]
        h, d = k_post.shape[1], k_post.shape[3]
        if family == "gpt_neox":  # fused qkv: (B, T, H * 3 * D), per head [q | k | v]
            raw = raw.view(1, raw.shape[1], h, 3 * d)[..., d : 2 * d]
        elif family == "phi3":  # fused qkv: [q (H_q * D) | k (H_kv * D) | v]
            hq = attn.config.num_attention_heads
            raw = raw[..., hq * d : hq * d + h * d].reshape(1, raw.shape[1], h, d)
        else:
            raw = raw.view(1, raw.shape[1], k_post.shape[1], -1)
        raw = raw.transpose(1, 2)[:, :, -layer.window_len :]
        if family == "gemma3":  # Gemma-3 normalises keys after k_proj, before RoPE
            raw = attn.k_norm(raw)
        torch.testing.assert_close(undone, raw, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer._redo_rope(undone, seq), k_post, atol=1e-5, rtol=1e-4)


def test_context_manager_leaves_the_model_as_it_was():
    model = make_tiny("llama")
    ids = _ids(80)
    before = reference_logits(model, ids[:, :60], ids[:, 60:])
    impl = model.config._attn_implementation
    with nq.nexusquant_evict(model, quality="max"):
        assert model.config._attn_implementation == "nexusquant"
        compressed_logits(model, ids[:, :60], ids[:, 60:], quality="max")
    assert model.config._attn_implementation == impl
    assert all(not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(reference_logits(model, ids[:, :60], ids[:, 60:]), before)
    with pytest.raises(RuntimeError, match="boom"):
        with nq.nexusquant_evict(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == impl
    assert all(not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(reference_logits(model, ids[:, :60], ids[:, 60:]), before)


def test_two_models_and_nested_blocks():
    a, b = make_tiny("llama", seed=1), make_tiny("qwen2", seed=2)
    ids = _ids(100)
    ref_b = reference_logits(b, ids[:, :80], ids[:, 80:])
    with nq.nexusquant_evict(a, quality=nq.E8_PRESETS["max"]):  # it evicts
        # b is untouched while a is compressed
        torch.testing.assert_close(reference_logits(b, ids[:, :80], ids[:, 80:]), ref_b)
        _, _, outer = compressed_logits(a, ids[:, :80], ids[:, 80:], quality=nq.E8_PRESETS["max"], recent_window=8)
        with nq.nexusquant_evict(a, **EXACT) as inner:
            cache = DynamicCache()
            with torch.no_grad():
                a(ids, **with_cache(a, cache), use_cache=True)
            assert inner.stats()["layers"][0]["dropped"] == 0  # the inner settings decide
        assert a.config._attn_implementation == "nexusquant"
    assert a.config._attn_implementation != "nexusquant"
    assert outer["layers"][0]["dropped"] > 0


def test_multi_turn_with_the_same_cache():
    model = make_tiny("llama")
    turn1, turn2 = _ids(70, seed=8), _ids(30, seed=9)
    # Without compression, two turns through nexusquant equal two turns through DynamicCache.
    with torch.no_grad():
        ref_cache = DynamicCache()
        model(turn1, **with_cache(model, ref_cache), use_cache=True)
        ref = model(turn2, **with_cache(model, ref_cache), use_cache=True).logits
        with nq.nexusquant_evict(model, **EXACT):
            cache = DynamicCache()
            model(turn1, **with_cache(model, cache), use_cache=True)
            got = model(turn2, **with_cache(model, cache), use_cache=True).logits
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
        with nq.nexusquant_evict(model, quality="balanced", recent_window=8) as s:
            out = model.generate(turn1, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
            cache = output_cache(out)
            seen1 = cache.get_seq_length()
            ids2 = torch.cat([out.sequences, turn2], dim=1)
            out2 = model.generate(ids2, **with_cache(model, cache), max_new_tokens=5, do_sample=False, pad_token_id=0)
            # the last token of turn 1 was generated but not yet cached; the last of turn 2 likewise
            assert cache.get_seq_length() == seen1 + 1 + turn2.shape[1] + 5 - 1
            assert s.stats()["ratio"] > 1.0
        assert out2.shape[1] == ids2.shape[1] + 5


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a layer's attributes (independent of nbytes())."""
    seen = set() if seen is None else seen
    total = 0
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() in seen or obj.numel() == 0:
            return 0
        seen.add(obj.data_ptr())
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("nexusquant"):
        for k, v in vars(obj).items():
            if k in ("settings", "rope_tables", "rope_adapter", "last_view", "codec"):
                continue
            total += _tensor_bytes(v, seen)
    return total


def test_nbytes_counts_every_tensor_held():
    model = make_tiny("gemma3")
    ids = _ids(200, seed=11)
    _, cache, stats = compressed_logits(
        model, ids[:, :160], ids[:, 160:], quality="balanced", recent_window=8, block=16, demote=0.2
    )
    for layer in cache.layers:
        assert layer.nbytes() == _tensor_bytes(layer)
    # The cache's bytes: its layers', and the rotary tables its pre-RoPE keys share.
    assert stats["rope_nbytes"] > 0
    assert stats["nbytes"] == sum(layer.nbytes() for layer in cache.layers) + stats["rope_nbytes"]
    assert stats["ratio"] == pytest.approx(stats["fp16_nbytes"] / stats["nbytes"])
    # Compressing really shrinks: codes hold far fewer bytes than fp32/fp16 tokens would (less so
    # at 160 tokens than at real lengths: the transform coder's basis is paid for 512 tokens).
    assert stats["ratio"] > 1.5


def test_generated_blocks_keep_their_own_value_width(tmp_path):
    """``generated_value_bits`` codes the values of generated blocks (their own tier where keys are
    transform-coded) at another width than the prompt's; files keep it; setting ``value_bits``
    explicitly resets a preset's value of it."""
    ids = _ids(200, seed=7)
    model = make_tiny("llama")
    knobs = dict(quality="balanced", recent_window=4, block=8, value_bits=2)
    _, cache, stats = compressed_logits(model, ids[:, :160], ids[:, 160:190], generated_value_bits=4, **knobs)
    _, _, plain = compressed_logits(model, ids[:, :160], ids[:, 160:190], **knobs)
    for layer in cache.layers:
        assert layer.fine.values.bits == 2
        assert layer.tiers["generated"].length > 0 and layer.tiers["generated"].values.bits == 4
    assert stats["nbytes"] > plain["nbytes"], "4-bit codes of the generated values cost more bytes"
    path = tmp_path / "g.nqkv"
    nq.save_cache(cache, path, token_ids=ids[:, :190])
    back = nq.load_cache(path, model)
    assert back.layers[0].settings.generated_value_bits == 4
    for a, b in zip(cache.layers, back.layers):
        gen_a, gen_b = a.tiers["generated"].values, b.tiers["generated"].values
        assert gen_b.bits == 4 and torch.equal(gen_a.dequantize(), gen_b.dequantize())
    with_width = resolve_settings("balanced", generated_value_bits=4)
    assert with_width.replace(value_bits=16).generated_value_bits is None
    assert with_width.replace(value_bits=16, generated_value_bits=3).generated_value_bits == 3
    with pytest.raises(nq.NexusQuantError, match="generated_value_bits"):
        resolve_settings("balanced", generated_value_bits=5)


def test_sliding_and_global_layers_take_their_own_key_bits():
    """In a model that mixes sliding and global layers, ``sliding_key_bits`` codes the sliding
    layers' keys and ``global_key_rate`` the global layers'; a model with one kind ignores both."""
    from nexusquant.tiers import TransformCodedKeys

    ids = _ids(200, seed=5)
    knobs = dict(quality="balanced", recent_window=8, block=16)
    model = make_tiny("gemma3")  # two sliding layers, one global
    _, cache, stats = compressed_logits(
        model, ids[:, :160], ids[:, 160:190], sliding_key_bits=2, global_key_rate=3.5, **knobs
    )
    assert [layer.is_sliding for layer in cache.layers] == [True, True, False]
    for layer in cache.layers:
        fine = layer.tiers["fine"]
        if layer.is_sliding:
            assert fine.length > 0 and fine.keys.bits == 2 and layer.tiers["generated"].keys.bits == 2
        else:
            assert isinstance(fine.keys, TransformCodedKeys) and fine.keys.rate == 3.5
            assert layer.tiers["generated"].keys.bits == nq.PRESETS["balanced"].key_bits
    _, _, preset = compressed_logits(model, ids[:, :160], ids[:, 160:190], **knobs)
    sliding_bytes = lambda st: sum(r["nbytes"] for r in st["layers"] if r["sliding"])  # noqa: E731
    assert sliding_bytes(stats) < sliding_bytes(preset)  # 2-bit codes against the preset's 4 bits

    # One kind of layer only: a model without sliding layers, and one sliding in every layer.
    llama = make_tiny("llama")
    _, cache, _ = compressed_logits(
        llama, ids[:, :160], ids[:, 160:170], sliding_key_bits=2, global_key_rate=3.5, **knobs
    )
    for layer in cache.layers:
        assert layer.tiers["fine"].keys.rate == nq.PRESETS["balanced"].key_rate
    mistral = make_tiny("mistral")
    _, cache, _ = compressed_logits(
        mistral, ids[:, :160], ids[:, 160:170], sliding_key_bits=2, global_key_rate=3.5, **knobs
    )
    assert all(layer.is_sliding for layer in cache.layers)
    for layer in cache.layers:
        assert layer.tiers["fine"].keys.bits == nq.PRESETS["balanced"].key_bits


def test_explicit_knobs_hold_in_every_kind_of_layer():
    from nexusquant.presets import resolve_settings

    assert nq.PRESETS["balanced"].sliding_key_bits == 3 and nq.PRESETS["balanced"].global_key_rate == 4.0
    exact = resolve_settings("balanced", key_bits=16)
    assert exact.key_bits == 16 and exact.sliding_key_bits is None  # exact keys in sliding layers too
    rate = resolve_settings("balanced", key_rate=2.5)
    assert rate.global_key_rate is None and rate.sliding_key_bits == 3
    both = nq.PRESETS["balanced"].replace(key_rate=2.5, global_key_rate=3.5)
    assert both.key_rate == 2.5 and both.global_key_rate == 3.5


def test_bad_settings_raise_clear_errors():
    model = make_tiny("llama")
    with pytest.raises(nq.NexusQuantError, match="unknown quality preset"):
        with nq.nexusquant_evict(model, quality="ultra"):
            pass
    with pytest.raises(nq.NexusQuantError, match="unknown setting"):
        with nq.nexusquant_evict(model, evict_rate=0.5):
            pass
    for bad in (
        dict(evict=1.2),
        dict(key_bits=5),
        dict(scorer="magic"),
        dict(evict=0.6, demote=0.5),
        dict(pool_kernel=4),
        dict(key_domain="sideways"),
        dict(key_attention_share=1.5),
        dict(key_attention_share=-0.1),
        dict(key_attention_share=True),
        dict(sliding_key_bits=5),
        dict(sliding_key_bits=True),
        dict(global_key_rate=0),
        dict(global_key_rate="high"),
    ):
        with pytest.raises(nq.NexusQuantError):
            nq.NexusQuantCache(model.config, **bad)
    assert isinstance(nq.NexusQuantError("x"), ValueError)
    assert model.config._attn_implementation != "nexusquant"


def test_standalone_cache_with_attention_implementation_set():
    model = make_tiny("llama")
    ids = _ids(120)
    model.set_attn_implementation("nexusquant")
    try:
        cache = nq.NexusQuantCache(model, preset="balanced", recent_window=8)
        out = model.generate(ids, **with_cache(model, cache), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape[1] == 126
        assert cache.compression_stats()["ratio"] > 1.5
        assert cache.nbytes() == cache.compression_stats()["nbytes"]
    finally:
        model.set_attn_implementation("sdpa")


def test_families_are_supported_on_current_transformers():
    import transformers
    from packaging.version import Version

    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt_neox"} <= set(ALL)
    if Version(transformers.__version__) >= Version("5.24"):
        assert "gptj" in ALL


def test_unsupported_model_is_named():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(nq.NexusQuantError, match="model type 'bert' is not supported"):
        with nq.nexusquant_evict(model):
            pass


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_fused_decode_path_matches_dequantized_attention(family, monkeypatch):
    """The decode path that reads codes (kernel on CUDA; its torch reference here) computes the same
    attention as dequantizing the layer first."""
    from nexusquant.cache import FUSED_REFERENCE_ENV

    model = make_tiny(family)
    ids = _ids(120, seed=12)
    knobs = dict(quality=nq.E8_PRESETS["balanced"], recent_window=8, block=16, demote=0.2)  # both E8 tiers
    ref, _, _ = compressed_logits(model, ids[:, :100], ids[:, 100:], **knobs)
    monkeypatch.setenv(FUSED_REFERENCE_ENV, "1")
    got, cache, _ = compressed_logits(model, ids[:, :100], ids[:, 100:], **knobs)
    assert cache.layers[0].last_view.lazy_tiers  # the fused path really ran
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_rope_table_records_a_forward_once_and_mirrors_per_device():
    """A model split over GPUs hands each layer its own copy of the rotary angles: the table records
    a forward once (not once per copy), and a layer on another device gathers from a copy on its
    own device, extended by the new rows only ("meta" stands in for a second GPU here)."""
    from nexusquant.rope import RopeTable

    t = RopeTable()
    cos, sin = torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    t.record(cos, sin, 0, forward=1)
    t.record(cos.clone(), sin.clone(), 0, forward=1)  # layer 1's copy of the same forward
    assert t.length == 10 and t.cos.data_ptr() == cos.data_ptr()
    c2, s2 = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    t.record(c2, s2, 10, forward=2)
    t.record(c2.clone(), s2.clone(), 10, forward=2)
    assert t.length == 11
    gc, gs = t.gather(torch.tensor([[[0, 10, 3]]]))
    assert torch.equal(gc[0, 0], torch.stack([cos[0, 0], c2[0, 0], cos[0, 3]]))
    assert torch.equal(gs[0, 0, 1], s2[0, 0])
    meta = torch.device("meta")
    mc, _ = t.mirror(meta)
    assert mc.device == meta and mc.shape == (1, 11, 8)
    t.record(torch.randn(1, 1, 8), torch.randn(1, 1, 8), 11, forward=3)
    assert t.mirror(meta)[0].shape == (1, 12, 8)
    assert t.gather(torch.zeros(1, 2, 5, dtype=torch.int32, device=meta))[0].shape == (1, 2, 5, 8)
    assert t.nbytes() == 2 * (2 * 12 * 8 * 4)  # the table and its copy, cos and sin
    t.record(cos, sin, 0, forward=4)  # a new sequence: the copies go
    assert t.nbytes() == 2 * 10 * 8 * 4


@torch.no_grad()
def test_tiers_hold_positions_once_where_every_head_holds_the_same_tokens():
    """A layer that keeps or drops a token in every KV head at once (transform-coded keys; or no
    eviction) holds each token's position once, not once per head, and counts only that; a layer
    that evicts per head holds them per head. ``Tier.seq`` reads the same either way."""
    model = make_tiny("llama")
    ids = torch.randint(3, 90, (2, 120), generator=torch.Generator().manual_seed(21))
    cases = (
        ("high", {}, True),
        (nq.E8_PRESETS["high"], dict(key_domain="pre_rope"), True),  # pre-RoPE keys need positions
        (nq.E8_PRESETS["balanced"], dict(key_domain="pre_rope"), False),  # evicts per head
    )
    for quality, knobs, shared in cases:
        with nq.nexusquant_evict(model, quality=quality, **knobs) as session:
            model(ids, use_cache=True)
        layer = session.cache.layers[0]
        assert layer.heads_share_tokens() == shared
        tier = layer.tiers["fine"]
        held, seq = tier.positions_held, tier.seq
        assert held is not None and seq is not None
        assert seq.shape == (2, layer.heads, tier.length)
        assert held.shape[1] == (1 if shared else layer.heads)
        if shared:
            assert torch.equal(seq, held.expand_as(seq))
        codes = tier.keys.nbytes() + tier.values.nbytes()
        valid = 0 if tier.valid is None else tier.valid.numel()
        assert tier.nbytes() == codes + held.numel() * held.element_size() + valid
