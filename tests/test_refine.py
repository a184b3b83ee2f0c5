"""Value refinement: the most attended tokens' value code error coded again (value_refine_share)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

import nexusquant as nq
from nexusquant._core import read_nqkv, write_nqkv
from nexusquant.compat import with_cache
from nexusquant.tiers import QuantizedTensor


def _vectors(b, h, t, d, seed):
    return torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(seed))


def test_refined_tokens_lose_less_and_the_rest_is_untouched():
    x = _vectors(2, 3, 100, 64, 0)
    rank = torch.rand(2, 3, 100, generator=torch.Generator().manual_seed(1))
    rank[1, :, 10:] = float("-inf")  # row 1 has 10 real tokens: 15 of its 25 entries refine nothing
    plain = QuantizedTensor(64, 2, 0, torch.float32)
    plain.append(x)
    refined = QuantizedTensor(64, 2, 0, torch.float32, refine_bits=2)
    refined.append(x, rank, 25)
    assert refined.refined == 25 and refined.ref_idx is not None and refined.ref_idx.dtype == torch.int16
    top = torch.topk(rank, 25, dim=2).indices
    chosen = torch.zeros(2, 3, 100, dtype=torch.bool).scatter_(2, top, True)
    err_plain = (plain.dequantize() - x).pow(2).sum(-1)
    err_refined = (refined.dequantize() - x).pow(2).sum(-1)
    real = torch.isfinite(rank)
    assert torch.equal(err_refined[~chosen], err_plain[~chosen]), "unrefined tokens decode as before"
    assert float(err_refined[chosen & real].mean()) < 0.3 * float(err_plain[chosen & real].mean())
    assert torch.equal(err_refined[chosen & ~real], err_plain[chosen & ~real]), "a padding slot refines nothing"
    assert refined.ref_scales is not None
    padding = ~real.gather(2, top)
    assert int(padding.sum()) == 3 * 15 and bool((refined.ref_scales[padding] == 0).all()), "spare entries: scale 0"
    # Every byte counted: codes and scales, plus per entry an int16 index, a code and a scale.
    codec = refined.refine_codec
    assert codec is not None
    assert refined.nbytes() == plain.nbytes() + 2 * 3 * 25 * (2 + codec.code_bytes_per_vector + 2)


def test_refinement_follows_appends_and_batch_selection():
    x = _vectors(2, 1, 60, 32, 2)
    q = QuantizedTensor(32, 1, 0, torch.float32, refine_bits=3)
    q.append(x[:, :, :40], torch.rand(2, 1, 40), 10)
    q.append(x[:, :, 40:], torch.rand(2, 1, 20), 5)
    assert q.refined == 15 and q.ref_idx is not None
    assert int(q.ref_idx[:, :, 10:].min()) >= 40, "a later append's indices point at its own tokens"
    whole = q.dequantize()
    q.map_batch(lambda t: t.index_select(0, torch.tensor([1])))
    assert torch.equal(q.dequantize(), whole[1:])


def test_long_tensors_switch_to_int32_indices():
    q = QuantizedTensor(8, 2, 0, torch.float32, refine_bits=2)
    q.append(_vectors(1, 1, 2**15 - 8, 8, 3), torch.rand(1, 1, 2**15 - 8), 4)
    assert q.ref_idx is not None and q.ref_idx.dtype == torch.int16
    q.append(_vectors(1, 1, 16, 8, 4), torch.rand(1, 1, 16), 4)
    assert q.ref_idx.dtype == torch.int32 and int(q.ref_idx[0, 0, -4:].min()) >= 2**15 - 8


@pytest.mark.parametrize("codec", ["e8", "pca"])
def test_cache_refines_the_most_attended_values(codec, tmp_path):
    model = make_tiny("llama")
    ids = torch.randint(1, 90, (2, 160), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    out = {}
    for share in (0.0, 0.5):
        knobs = dict(quality="balanced", key_codec=codec, key_bits=16, value_bits=1, recent_window=8)
        with torch.no_grad(), nq.nexusquant_evict(model, value_refine_share=share, **knobs) as s:
            cache = nq.NexusQuantCache(model, preset=s.settings)
            model(ids[:, :-1], attention_mask=mask[:, :-1], **with_cache(model, cache))
            out[share] = model(ids[:, -1:], attention_mask=mask, **with_cache(model, cache)).logits[:, -1]
        if share:
            refined = cache
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits[:, -1]
    fine = refined.layers[0].fine
    assert fine.values.refined == round(0.5 * fine.length)
    err = {k: float((v - ref).abs().max()) for k, v in out.items()}
    assert err[0.5] < err[0.0], f"refined values decode closer to the uncompressed cache: {err}"
    # Files keep it exactly.
    path = tmp_path / "c.nqkv"
    nq.save_cache(refined, path, token_ids=ids)
    back = nq.load_cache(path, model)
    assert back.nbytes() == refined.nbytes()
    for a, b in zip(refined.layers, back.layers):
        assert torch.equal(a.fine.values.dequantize(), b.fine.values.dequantize())


def test_sliding_layers_and_other_attention_do_not_refine():
    model = make_tiny("gemma3")
    ids = torch.randint(1, 90, (1, 150), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), nq.nexusquant_evict(model, quality="high", recent_window=8, value_refine_share=0.5) as s:
        cache = nq.NexusQuantCache(model, preset=s.settings)
        model(ids, **with_cache(model, cache))
    for layer in cache.layers:
        assert (layer.fine.values.refined == 0) == layer.is_sliding
    # Under SDPA nothing measures attention: nothing is refined.
    plain = make_tiny("llama")
    sdpa = nq.NexusQuantCache(plain, quality_settings := nq.PRESETS["balanced"].replace(value_refine_share=0.5))
    assert quality_settings.value_refine_share == 0.5
    with torch.no_grad():
        plain(ids, **with_cache(plain, sdpa))
        plain(ids[:, -1:], **with_cache(plain, sdpa))
    assert all(layer.fine.values.refined == 0 for layer in sdpa.layers)


def test_bad_refinement_settings_and_files_raise(tmp_path):
    model = make_tiny("llama")
    for bad in (dict(value_refine_share=1.5), dict(value_refine_share=-0.1), dict(value_refine_bits=5)):
        with pytest.raises(nq.NexusQuantError):
            nq.NexusQuantCache(model.config, **bad)
    ids = torch.randint(1, 90, (1, 120), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), nq.nexusquant_evict(model, quality="balanced", recent_window=8, value_refine_share=0.3) as s:
        cache = nq.NexusQuantCache(model, preset=s.settings)
        model(ids, **with_cache(model, cache))
    nq.save_cache(cache, tmp_path / "ok.nqkv", token_ids=ids)
    sections = read_nqkv(str(tmp_path / "ok.nqkv"))

    def rewritten(edit_layer=None, edit_meta=None):
        out, first = [], True
        for kind, payload in sections:
            if kind == "META" and edit_meta is not None:
                meta = json.loads(bytes(payload))
                edit_meta(meta)
                payload = json.dumps(meta).encode()
            elif kind == "LAYR" and first:
                payload = dict(payload)
                if edit_layer is not None:
                    edit_layer(payload)
                first = False
            out.append((kind, payload))
        path = tmp_path / "bad.nqkv"
        write_nqkv(str(path), out)
        return path

    def far_index(arrays):
        idx = np.array(arrays["fine.v.ref_idx"])
        idx[0, 0, 0] = 10_000
        arrays["fine.v.ref_idx"] = idx

    def no_refinement_setting(meta):
        meta["settings"]["value_refine_share"] = 0.0

    for path in (rewritten(edit_layer=far_index), rewritten(edit_meta=no_refinement_setting)):
        with pytest.raises(nq.CorruptFileError):
            nq.load_cache(path, model)


@torch.no_grad()
def test_chunked_prefill_refines_each_chunk_by_its_own_queries():
    model = make_tiny("llama")
    ids = torch.randint(1, 90, (1, 500), generator=torch.Generator().manual_seed(9))
    knobs = dict(quality="balanced", recent_window=8, value_refine_share=0.2)
    with nq.nexusquant_evict(model, chunk_size=100, **knobs) as session:
        logits = model(ids, use_cache=True).logits
    with nq.nexusquant_evict(model, **knobs) as one_shot:
        model(ids, use_cache=True)
    assert torch.isfinite(logits).all()
    chunked, whole = session.cache.layers[0].fine.values, one_shot.cache.layers[0].fine.values
    assert chunked.ref_idx is not None and whole.ref_idx is not None
    # about a fifth of the coded tokens either way, chosen chunk by chunk
    assert abs(chunked.refined - whole.refined) <= 5 and chunked.refined >= 0.18 * chunked.length
    assert not torch.equal(chunked.ref_idx, whole.ref_idx)
