"""Saving and loading compressed caches: exact round trips and every kind of bad file."""

from __future__ import annotations

import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from tiny_models import make_tiny
from transformers import DynamicCache

import nexusquant as nq
from nexusquant.compat import with_cache


def _ids(n, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, n), generator=g)


def _prefilled(model, ids, **knobs):
    with nq.nexusquant_evict(model, **knobs), torch.no_grad():
        cache = DynamicCache()
        model(ids, use_cache=True, **with_cache(model, cache))
    return cache


def _continue(model, cache, cont, knobs):
    with nq.nexusquant_evict(model, **knobs), torch.no_grad():
        return torch.cat(
            [
                model(cont[:, i : i + 1], use_cache=True, **with_cache(model, cache)).logits
                for i in range(cont.shape[1])
            ],
            1,
        )


@pytest.mark.parametrize(
    "family,knobs",
    [
        ("llama", dict(quality=nq.E8_PRESETS["balanced"], recent_window=8, demote=0.2)),  # both E8 tiers
        ("gemma3", dict(quality=nq.E8_PRESETS["max"], recent_window=8, key_bits=3)),
        ("gemma3", dict(quality="max", recent_window=8)),  # transform-coded keys, a table of positions
        ("gemma3", dict(quality="balanced", recent_window=8, sliding_key_bits=2, global_key_rate=3.5)),
        ("qwen2", dict(quality="high", recent_window=8, key_domain="pre_rope")),
    ],
)
def test_round_trip_is_exact(tmp_path, family, knobs):
    model = make_tiny(family)
    ids = _ids(420)
    prompt, cont = ids[:, :400], ids[:, 400:]
    cache = _prefilled(model, prompt, **knobs)
    path = tmp_path / "prefix.nqkv"
    info = nq.save_cache(cache, path)
    assert info["file_bytes"] == os.path.getsize(path)
    if family == "llama":
        # Where codes dominate (not fp32 windows of tiny sliding layers), the entropy-packed file
        # is smaller than what the cache holds in memory.
        assert info["file_bytes"] < info["resident_bytes"]
    loaded = nq.load_cache(path, model)
    assert torch.equal(loaded.token_ids, prompt)
    for a, b in zip(cache.layers, loaded.layers):
        ka, va, sa, ma = a._compressed_parts()
        kb, vb, sb, mb = b._compressed_parts() if b.rope_adapter or b.settings.key_domain != "pre_rope" else (None,) * 4
        if kb is not None:
            assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert torch.equal(a.win_k, b.win_k) and torch.equal(a.win_v, b.win_v)
        assert a.seen == b.seen and a.nbytes() == b.nbytes()
    want = _continue(model, cache, cont, knobs)
    got = _continue(model, loaded, cont, knobs)
    assert torch.equal(got, want)


def test_padded_batch_and_generate_after_load(tmp_path):
    model = make_tiny("llama")
    batch = _ids(100, batch=2)
    mask = torch.ones_like(batch)
    mask[1, :30] = 0
    knobs = dict(quality="balanced", recent_window=8)
    with nq.nexusquant_evict(model, **knobs):
        out = model.generate(
            batch, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0, return_dict_in_generate=True
        )
    from nexusquant.compat import output_cache

    cache = output_cache(out)
    nq.save_cache(cache, tmp_path / "b.nqkv")
    loaded = nq.load_cache(tmp_path / "b.nqkv", model)
    assert loaded.layers[0].fine.valid is not None  # ragged rows survive
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    kw = dict(
        attention_mask=torch.cat([full_mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    with nq.nexusquant_evict(model, **knobs):
        ids2 = torch.cat([out.sequences, torch.full((2, 1), 7)], 1)
        a = model.generate(ids2, **with_cache(model, cache), **kw)
        b = model.generate(ids2, **with_cache(model, loaded), **kw)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_tiny("llama")
    cache = _prefilled(model, _ids(90), quality="balanced", recent_window=8)
    path = tmp_path_factory.mktemp("files") / "good.nqkv"
    nq.save_cache(cache, path)
    return model, path, path.read_bytes()


def test_wrong_model_is_refused(saved):
    _, path, _ = saved
    other = make_tiny("qwen2")
    with pytest.raises(nq.NexusQuantError, match="different model"):
        nq.load_cache(path, other)


def test_truncated_and_bit_flipped_files_raise(saved, tmp_path):
    model, _, good = saved
    bad = tmp_path / "bad.nqkv"
    rng = np.random.default_rng(0)
    cuts = sorted(set(rng.integers(0, len(good), 60).tolist()) | {0, 1, 63, 64, 95, 96, len(good) - 1})
    flips = sorted(set(rng.integers(0, len(good), 120).tolist()) | {0, 9, 12, 20, 60, len(good) - 1})
    t0 = time.perf_counter()
    for cut in cuts:
        bad.write_bytes(good[:cut])
        with pytest.raises(nq.NexusQuantError):
            nq.load_cache(bad, model)
    for pos in flips:
        b = bytearray(good)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(b))
        with pytest.raises(nq.NexusQuantError):
            nq.load_cache(bad, model)
    assert time.perf_counter() - t0 < 120  # each refusal is quick (no hang, no huge allocation)


def _fix_header_crc(b: bytearray) -> None:
    b[60:64] = struct.pack("<I", zlib.crc32(bytes(b[:60])))


def test_newer_version_foreign_and_absurd_sizes(saved, tmp_path):
    model, _, good = saved
    bad = tmp_path / "x.nqkv"
    b = bytearray(good)
    b[8:10] = struct.pack("<H", 99)
    _fix_header_crc(b)
    bad.write_bytes(bytes(b))
    with pytest.raises(nq.UnsupportedVersionError):
        nq.load_cache(bad, model)
    bad.write_bytes(b'{"format": "something else"}' * 10)
    with pytest.raises(nq.NexusQuantError):
        nq.load_cache(bad, model)
    # A section claiming 2^60 stored bytes (header checksums made consistent) fails fast.
    b = bytearray(good)
    b[64 + 8 : 64 + 16] = struct.pack("<Q", 1 << 60)
    b[64 + 28 : 64 + 32] = struct.pack("<I", zlib.crc32(bytes(b[64 : 64 + 28])))
    bad.write_bytes(bytes(b))
    t0 = time.perf_counter()
    with pytest.raises(nq.NexusQuantError):
        nq.load_cache(bad, model)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(FileNotFoundError):
        nq.load_cache(tmp_path / "missing.nqkv", model)


def test_failed_write_keeps_the_old_file(saved, tmp_path):
    model, path, good = saved
    target = tmp_path / "keep.nqkv"
    target.write_bytes(good)
    with pytest.raises(nq.NexusQuantError):
        nq.save_cache(DynamicCache(), target)  # not a nexusquant cache: nothing is written
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nqkv"]


def test_inspect_reports_sizes_and_ratios(saved):
    _, path, good = saved
    info = nq.inspect_file(path)
    assert info["file_bytes"] == len(good)
    assert info["checksums"] == "verified"
    assert len(info["layer_array_bytes"]) == 2
    assert info["file_ratio"] > 1 and info["resident_ratio"] > 1
    assert info["resident_bytes"] == info["fp16_bytes"] / info["resident_ratio"]


def test_inspect_command_prints_report_and_rejects_damage(saved, tmp_path, capsys):
    from nexusquant.cli import main

    _, path, good = saved
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "checksums verified" in out and f"{len(good):,}" in out
    assert main(["inspect", "--json", str(path)]) == 0
    assert f'"file_bytes": {len(good)}' in capsys.readouterr().out
    bad = tmp_path / "bad.nqkv"
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x10
    bad.write_bytes(bytes(damaged))
    assert main(["inspect", str(bad)]) == 2
    assert "nexusquant inspect: error:" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.nqkv")]) == 2
