"""Rotary tables (nexusquant.rope.RopeTable): held as half rows where the model repeats them, and
recorded by a session or by a cache made with the model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import family_supported, make_tiny
from transformers import DynamicCache

import nexusquant as nq
from nexusquant._core import read_nqkv, write_nqkv
from nexusquant.cache import NexusQuantCache
from nexusquant.compat import output_cache, with_cache
from nexusquant.rope import RopeFormula, RopeTable, _repeats_half


def _angles(n: int, r: int, start: int = 0, repeat: bool = True):
    f = torch.arange(start, start + n, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, r // 2)[None]
    emb = torch.cat([f, f], -1) if repeat else torch.cat([f, 2 * f], -1)
    return emb.cos()[None], emb.sin()[None]


def test_half_rows_are_held_and_gathered_whole():
    table = RopeTable()
    cos, sin = _angles(10, 8)
    table.record(cos, sin, 0, forward=1)
    assert table.half and table.cos.shape == (1, 10, 4)
    more_cos, more_sin = _angles(3, 8, start=10)
    table.record(more_cos, more_sin, 10, forward=2)
    seq = torch.tensor([[[0, 4, 12]]], dtype=torch.int32)
    c, s = table.gather(seq)
    full_cos = torch.cat([cos, more_cos], 1)[0, [0, 4, 12]]
    full_sin = torch.cat([sin, more_sin], 1)[0, [0, 4, 12]]
    assert torch.equal(c[0, 0], full_cos) and torch.equal(s[0, 0], full_sin)
    assert table.nbytes() == 2 * 13 * 4 * 4


def test_a_table_whose_halves_differ_is_held_whole():
    table = RopeTable()
    cos, sin = _angles(6, 8)
    table.record(cos, sin, 0, forward=1)
    odd_cos, odd_sin = _angles(2, 8, start=6, repeat=False)
    table.record(odd_cos, odd_sin, 6, forward=2)  # from now on the rows differ: whole rows
    assert not table.half and table.cos.shape == (1, 8, 8)
    c, _ = table.gather(torch.tensor([[[1, 7]]], dtype=torch.int32))
    assert torch.equal(c[0, 0, 0], cos[0, 1]) and torch.equal(c[0, 0, 1], odd_cos[0, 1])


@pytest.mark.parametrize("family", [f for f in ("llama", "gemma3", "gptj") if family_supported(f)])
@torch.no_grad()
def test_half_tables_give_the_same_logits_and_files(family, tmp_path, monkeypatch):
    model = make_tiny(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (1, 90), generator=g)
    knobs = dict(quality="high", key_domain="pre_rope", recent_window=8, block=8)
    # Rows, not positions: the formula's frequencies are hidden from the recorder.
    monkeypatch.setattr("nexusquant.rope.rotary_sources", lambda model: [])

    def run():
        with nq.nexusquant_evict(model, **knobs) as session:
            out = model(ids[:, :80], use_cache=True)
            cache = output_cache(out)
            logits = [
                model(ids[:, i : i + 1], **with_cache(model, cache), use_cache=True).logits for i in range(80, 90)
            ]
        return torch.cat(logits, 1), cache, session

    got, cache, _ = run()
    halves = [t.half for t in cache.rope_tables.values()]
    monkeypatch.setattr("nexusquant.rope._repeats_half", lambda x: False)
    want, whole, _ = run()
    assert torch.equal(got, want)
    if family != "gptj":  # split-half layouts repeat their rows; GPT-J's interleaved one does not
        assert all(halves) and nq.compression_stats(cache)["nbytes"] < nq.compression_stats(whole)["nbytes"]
    monkeypatch.setattr("nexusquant.rope._repeats_half", _repeats_half)
    nq.save_cache(cache, tmp_path / "h.nqkv")
    loaded = nq.load_cache(tmp_path / "h.nqkv", model)
    assert [t.half for t in loaded.rope_tables.values()] == halves
    with nq.nexusquant_evict(model, **knobs):
        a = model(ids[:, 89:90], **with_cache(model, cache), use_cache=True).logits
        b = model(ids[:, 89:90], **with_cache(model, loaded), use_cache=True).logits
    assert torch.equal(a, b)


def _file_with_rope_table_edited(tmp_path, edit):
    """A tiny Llama's pre-RoPE cache saved, then written again with ``edit`` applied to rotary table
    0's META entry (the checksums stay valid): ``(model, path of the edited file)``."""
    model = make_tiny("llama")
    ids = torch.randint(3, 90, (1, 60), generator=torch.Generator().manual_seed(1))
    with nq.nexusquant_evict(model, quality="high", key_domain="pre_rope", recent_window=8) as session:
        model(ids, use_cache=True)
    nq.save_cache(session.cache, tmp_path / "ok.nqkv")
    sections = read_nqkv(str(tmp_path / "ok.nqkv"))
    meta = json.loads(bytes(sections[0][1]))
    edit(meta["rope_tables"]["0"])
    write_nqkv(str(tmp_path / "bad.nqkv"), [("META", json.dumps(meta).encode())] + list(sections[1:]))
    return model, tmp_path / "bad.nqkv"


def test_a_bad_half_flag_is_a_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setattr("nexusquant.rope.rotary_sources", lambda model: [])

    def edit(entry):
        assert entry["half"] is True
        entry["half"] = "yes"

    model, bad = _file_with_rope_table_edited(tmp_path, edit)
    with pytest.raises(nq.CorruptFileError, match="half must be true or false"):
        nq.load_cache(bad, model)


@pytest.mark.parametrize("family", [f for f in ("llama", "gemma3") if family_supported(f)])
@torch.no_grad()
def test_a_cache_made_with_the_model_records_its_own_angles(family):
    """NexusQuantCache(model, key_domain="pre_rope") hooks the model's attention to record the
    rotary angles, so a cache managed by hand holds pre-RoPE keys without nexusquant_evict: the
    same logits as the session; the hooks act on this cache's calls only and go with the cache."""
    import gc

    from nexusquant.architecture import attention_modules

    model = make_tiny(family)
    ids = torch.randint(3, 90, (1, 90), generator=torch.Generator().manual_seed(2))
    knobs = dict(key_domain="pre_rope", recent_window=8, block=8)

    def decode(cache):
        out = [model(ids[:, :80], **with_cache(model, cache), use_cache=True).logits[:, -1:]]
        out += [model(ids[:, i : i + 1], **with_cache(model, cache), use_cache=True).logits for i in range(80, 90)]
        return torch.cat(out, 1)

    with nq.nexusquant_evict(model, quality="high", **knobs):
        want = decode(DynamicCache(config=model.config))
    attention = attention_modules(model)
    hooks_before = len(attention[0]._forward_pre_hooks)
    model.set_attn_implementation("nexusquant")
    try:
        cache = NexusQuantCache(model, preset="high", **knobs)
        assert cache.records_own_rope and len(attention[0]._forward_pre_hooks) == hooks_before + 1
        got = decode(cache)
        assert torch.equal(got, want)
        # Another cache in the same model is left alone by this one's hooks (and records its own).
        other = NexusQuantCache(model, preset="high", **knobs)
        model(ids[:, :50], **with_cache(model, other), use_cache=True)
        assert all(t.length == 90 for t in cache.rope_tables.values())
        assert all(t.length == 50 for t in other.rope_tables.values())
        # Inside a session the cache records once, not twice.
        with nq.nexusquant_evict(model, quality="high", **knobs):
            model(ids[:, 50:60], **with_cache(model, other), use_cache=True)
        assert all(t.length == 60 for t in other.rope_tables.values())
        # A copy has no hooks: it leaves its angles to a session, which records them.
        copied = copy.deepcopy(other)
        assert not copied.records_own_rope
        with nq.nexusquant_evict(model, quality="high", **knobs):
            model(ids[:, 60:64], **with_cache(model, copied), use_cache=True)
        assert all(t.length == 64 for t in copied.rope_tables.values())
        assert all(t.length == 60 for t in other.rope_tables.values())
        del copied
    finally:
        model.set_attn_implementation("sdpa")
    del cache, other
    gc.collect()
    assert len(attention[0]._forward_pre_hooks) == hooks_before
    # Under SDPA (compression before the next forward) it records every token too.
    cache = NexusQuantCache(model, preset="high", **knobs)
    decode(cache)
    assert all(t.length == 90 for t in cache.rope_tables.values())
    # Made from the config alone it cannot hook anything: the first compression says what to do.
    with pytest.raises(nq.NexusQuantError, match=r"NexusQuantCache\(model"):
        decode(NexusQuantCache(model.config, preset="high", **knobs))


def _formula(r: int = 8, scaling: float = 1.0) -> RopeFormula:
    return RopeFormula(1.0 / (100.0 ** (torch.arange(0, r, 2, dtype=torch.float32) / r)), scaling, torch.float32)


def test_a_table_of_positions_recomputes_the_angles_and_turns_into_rows_when_they_stop_matching():
    f = _formula()
    pos = torch.arange(10)[None]
    cos, sin = f.angles(pos)
    table = RopeTable()
    table.record(cos, sin, 0, forward=1, positions=pos, formulas=lambda: [_formula(r=6), f])
    assert table.formula is f and table.cos is None and table.nbytes() == 10 * 4 + 4 * 4
    more = torch.arange(10, 13)[None]
    table.record(*f.angles(more), 10, forward=2, positions=more, formulas=lambda: [])
    assert table.length == 13 and table.formula is f
    c, s = table.gather(torch.tensor([[[0, 4, 12]]], dtype=torch.int32))
    want_c, want_s = f.angles(torch.tensor([[0, 4, 12]]))
    assert torch.equal(c[0], want_c) and torch.equal(s[0], want_s)
    # Angles the formula does not give (frequencies rescaled, as dynamic scaling does): rows from now on.
    odd = torch.arange(13, 15)[None]
    odd_cos, odd_sin = _formula(scaling=0.5).angles(odd)
    table.record(odd_cos, odd_sin, 13, forward=3, positions=odd, formulas=lambda: [])
    assert table.formula is None and table.half and table.length == 15
    c, s = table.gather(torch.tensor([[[4, 14]]], dtype=torch.int32))
    assert torch.equal(c[0, 0, 0], want_c[0, 1]) and torch.equal(s[0, 0, 1], odd_sin[0, 1])
    # Without positions, or angles no formula gives, a new sequence is held as rows.
    table.record(cos, sin, 0, forward=4, positions=None, formulas=lambda: [f])
    assert table.formula is None and table.length == 10
    table.record(odd_cos, odd_sin, 0, forward=5, positions=odd, formulas=lambda: [f])
    assert table.formula is None


@pytest.mark.parametrize("family", [f for f in ("llama", "gemma3") if family_supported(f)])
@torch.no_grad()
def test_positions_tables_give_the_logits_of_rows_and_survive_files(family, tmp_path, monkeypatch):
    """Where transformers' default rotary formula gives the model's angles, a table holds positions
    (4 bytes a token) and recomputes the angles: the same logits as a table of rows, fewer bytes,
    and a file that loads to the same cache. Batch 2 with left padding: the padded row's positions
    are not its sequence indices."""
    model = make_tiny(family)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 90, (2, 90), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate makes them
    knobs = dict(quality="high", key_domain="pre_rope", recent_window=8, block=8)

    def step(i: int, j: int, cache=None):
        kw = dict(attention_mask=mask[:, :j], position_ids=pos[:, i:j], use_cache=True)
        return model(ids[:, i:j], **kw, **({} if cache is None else with_cache(model, cache)))

    def run():
        with nq.nexusquant_evict(model, **knobs):
            cache = output_cache(step(0, 80))
            logits = [step(i, i + 1, cache).logits for i in range(80, 90)]
        return torch.cat(logits, 1), cache

    got, cache = run()
    assert cache.rope_tables and all(t.formula is not None for t in cache.rope_tables.values())
    monkeypatch.setattr("nexusquant.rope.rotary_sources", lambda model: [])
    want, rows = run()
    assert all(t.formula is None for t in rows.rope_tables.values())
    monkeypatch.undo()
    # One unit in the last place of float32 where the two cos code paths round differently.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for t in cache.rope_tables.values():  # an int32 per token and row, and the frequencies
        assert t.formula is not None and t.nbytes() == 4 * 2 * 90 + 4 * t.formula.inv_freq.numel()
    assert nq.compression_stats(cache)["nbytes"] < nq.compression_stats(rows)["nbytes"]
    nq.save_cache(cache, tmp_path / "p.nqkv")
    loaded = nq.load_cache(tmp_path / "p.nqkv", model)
    assert all(t.formula is not None for t in loaded.rope_tables.values())
    assert torch.equal(next(iter(loaded.rope_tables.values())).positions[1, :10], pos[1, :10].to(torch.int32))
    with nq.nexusquant_evict(model, **knobs):
        a = step(89, 90, cache).logits
        b = step(89, 90, loaded).logits
    assert torch.equal(a, b)


def test_a_bad_rotary_formula_is_a_corrupt_file(tmp_path):
    def edit(entry):
        assert entry["formula"]["scaling"] == 1.0
        entry["formula"]["scaling"] = "one"

    model, bad = _file_with_rope_table_edited(tmp_path, edit)
    with pytest.raises(nq.CorruptFileError, match="scaling must be a finite number"):
        nq.load_cache(bad, model)


@pytest.mark.parametrize("family", ["llama", "phi3", "gptj", "gpt_neox"])
def test_angles_shared_by_every_head_rotate_as_per_head_angles(family):
    """Keys whose heads hold the same tokens are rotated with one set of angles broadcast over the
    heads (no per-head copies of the angles): exactly what the per-head angles give."""
    from nexusquant.rope import RopeAdapter

    if not family_supported(family):
        pytest.skip(f"{family} not in this transformers")
    model = make_tiny(family)
    attn = next(
        m for m in model.modules() if hasattr(m, "k_proj") or hasattr(m, "query_key_value") or hasattr(m, "qkv_proj")
    )
    adapter = RopeAdapter(attn)
    g = torch.Generator().manual_seed(3)
    d = model.config.hidden_size // model.config.num_attention_heads
    r = (adapter.rotary_dim or d) // (2 if adapter.kind == "gptj" else 1)
    k = torch.randn(2, 4, 9, d, generator=g)
    cos, sin = torch.randn(2, 1, 9, r, generator=g), torch.randn(2, 1, 9, r, generator=g)
    for inverse in (False, True):
        shared = adapter.rotate(k, cos, sin, inverse=inverse)
        per_head = adapter.rotate(k, cos.expand(2, 4, 9, r), sin.expand(2, 4, 9, r), inverse=inverse)
        assert torch.equal(shared, per_head)
