"""Cache files at their edges: checksum-valid files with bad contents, decompression bombs, FIFOs,
dtype changes, permissions, symlinks and token ids that do not fit the format."""

from __future__ import annotations

import json
import os
import stat
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

import nexusquant as nq
from nexusquant._core import read_nqkv, write_nqkv
from nexusquant.compat import with_cache


def _ids(n, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, n), generator=g)


def _prefill(model, ids, quality="balanced", **knobs):
    with nq.nexusquant_evict(model, quality, **knobs), torch.no_grad():
        cache = nq.NexusQuantCache(model, quality, **knobs)
        model(ids, use_cache=True, **with_cache(model, cache))
    return cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_tiny("llama")
    knobs = dict(quality=nq.E8_PRESETS["balanced"], recent_window=8, demote=0.2)  # both E8 tiers
    cache = _prefill(model, _ids(90), **knobs)
    path = tmp_path_factory.mktemp("edges") / "good.nqkv"
    nq.save_cache(cache, path)
    return model, path, read_nqkv(str(path))


def _rewrite(sections, path, meta=None, layer=None, raw_meta=None):
    """Write ``sections`` again (valid checksums), with META or layer 0's arrays changed."""
    out = []
    layers_seen = 0
    for kind, payload in sections:
        if kind == "META":
            m = json.loads(bytes(payload))
            if meta is not None:
                meta(m)
            payload = raw_meta if raw_meta is not None else json.dumps(m).encode()
        elif kind == "LAYR":
            payload = dict(payload)
            if layers_seen == 0 and layer is not None:
                layer(payload)
            layers_seen += 1
        out.append((kind, payload))
    write_nqkv(str(path), out)
    return path


def _set(key, value):
    def edit(d):
        if value is _DELETE:
            del d[key]
        else:
            d[key] = value

    return edit


_DELETE = object()


def _layer0(key, value):
    def edit(m):
        if value is _DELETE:
            del m["layers"][0][key]
        else:
            m["layers"][0][key] = value

    return edit


@pytest.mark.parametrize(
    "name,edit",
    [
        ("no fingerprint", dict(meta=_set("fingerprint", _DELETE))),
        ("layers null", dict(meta=_set("layers", None))),
        ("layers of strings", dict(meta=_set("layers", ["x", "y"]))),
        ("settings a list", dict(meta=_set("settings", [1, 2]))),
        ("seen a string", dict(meta=_layer0("seen", "many"))),
        ("batch missing", dict(meta=_layer0("batch", _DELETE))),
        ("dtype unknown", dict(meta=_layer0("dtype", "float8"))),
        ("fine length huge", dict(meta=_layer0("fine", {"length": 10**9}))),
        ("heads wrong", dict(meta=_layer0("heads", 3))),
        ("token shape wrong", dict(meta=_set("token_ids_shape", [1, 5]))),
        (
            "deeply nested JSON",
            dict(raw_meta=b'{"format": "nexusquant-kv-cache", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
        ),
        ("META not JSON", dict(raw_meta=b"{not json")),
        ("missing array", dict(layer=_set("win_v", _DELETE))),
        ("window of the wrong shape", dict(layer=lambda d: d.update(win_k=d["win_k"][:, :, :-1]))),
        ("window of the wrong dtype", dict(layer=lambda d: d.update(win_k=d["win_k"].astype(np.float64)))),
        ("center of the wrong shape", dict(layer=lambda d: d.update(k_center=np.concatenate([d["k_center"]] * 2, 2)))),
        ("validity not bool", dict(layer=lambda d: d.update(win_valid=d["win_valid"].astype(np.uint8)))),
        ("offsets of the wrong length", dict(layer=lambda d: d.update({"fine.k.offsets": d["fine.k.offsets"][:-1]}))),
        (
            "codes swapped between tiers",
            dict(
                layer=lambda d: d.update(
                    {"fine.k.packed": d["coarse.k.packed"], "fine.k.offsets": d["coarse.k.offsets"]}
                )
            ),
        ),
        ("unknown array", dict(layer=_set("surprise", np.zeros(3, np.float32)))),
        ("layer not a directory", dict(layer=lambda d: d.clear())),
    ],
)
def test_checksum_valid_files_with_bad_contents_raise_nexusquant_error(saved, tmp_path, name, edit):
    model, _, sections = saved
    path = _rewrite(sections, tmp_path / "bad.nqkv", **edit)
    with pytest.raises(nq.NexusQuantError):
        nq.load_cache(path, model)
    if name in ("no fingerprint", "layers null", "deeply nested JSON", "META not JSON", "layers of strings"):
        with pytest.raises(nq.NexusQuantError):
            nq.inspect_file(path)


def test_token_ids_outside_the_vocabulary_are_refused(saved, tmp_path):
    model, _, sections = saved
    out = [(k, (np.full(len(p) // 4, 2**31, dtype="<u4").tobytes() if k == "TOKN" else p)) for k, p in sections]
    write_nqkv(str(tmp_path / "t.nqkv"), out)
    with pytest.raises(nq.NexusQuantError, match="vocabulary"):
        nq.load_cache(tmp_path / "t.nqkv", model)


def _zstd_rle_frame(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes made of RLE blocks (4 bytes per 128 KiB), built by hand so
    the test never holds the expanded bytes."""
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", size)  # single segment, 8-byte size
    block = 128 << 10
    left = size
    while left > 0:
        n = min(block, left)
        left -= n
        header = (1 if left == 0 else 0) | (1 << 1) | (n << 3)  # last flag, type RLE, size
        frame += struct.pack("<I", header)[:3] + b"\x00"
    return frame


def _nqkv(sections: list[tuple[bytes, int, bytes, int]]) -> bytes:
    """File bytes from (kind, coder, stored payload, decoded length), with every checksum right."""
    body = b""
    for kind, coder, payload, decoded in sections:
        h = kind + bytes([coder, 0, 0, 0]) + struct.pack("<QQI", len(payload), decoded, zlib.crc32(payload))
        body += h + struct.pack("<I", zlib.crc32(h)) + payload
    head = b"\x89NQKV\r\n\x1a" + struct.pack("<HHIQ", 1, 0, len(sections), 64 + len(body)) + bytes(36)
    return head + struct.pack("<I", zlib.crc32(head)) + body


def test_a_decompression_bomb_is_refused_before_it_expands(saved, tmp_path):
    """32 KiB with valid checksums, one zstd section that would expand to 1 GiB: the shapes META
    records bound what each section may decode to, so the reader refuses it unexpanded."""
    model, _, sections = saved
    meta = bytes(sections[0][1])
    bomb = _zstd_rle_frame(1 << 30)
    data = _nqkv([(b"META", 0, meta, len(meta)), (b"LAYR", 1, bomb, 1 << 30)])
    path = tmp_path / "bomb.nqkv"
    path.write_bytes(data)
    assert len(data) < 40_000
    for read in (lambda: nq.load_cache(path, model), lambda: nq.inspect_file(path)):
        t0 = time.perf_counter()
        with pytest.raises(nq.NexusQuantError, match="more than the limit"):
            read()
        assert time.perf_counter() - t0 < 2


def test_fifo_is_refused_without_blocking(tmp_path, saved):
    model = saved[0]
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    for read in (lambda: nq.inspect_file(fifo), lambda: nq.load_cache(fifo, model)):
        with pytest.raises(nq.NexusQuantError, match="not a regular file"):
            read()


def test_cache_from_a_float32_model_continues_in_a_bfloat16_one(tmp_path):
    model32 = make_tiny("llama")
    cache = _prefill(model32, _ids(90), quality="balanced", recent_window=8)
    nq.save_cache(cache, tmp_path / "c.nqkv")
    model16 = make_tiny("llama", dtype=torch.bfloat16)
    loaded = nq.load_cache(tmp_path / "c.nqkv", model16)
    layer = loaded.layers[0]
    assert layer.win_k.dtype == torch.bfloat16 and layer.sink_k.dtype == torch.bfloat16
    assert layer.fine.keys.dequantize().dtype == torch.bfloat16
    with nq.nexusquant_evict(model16, quality="balanced", recent_window=8):
        out = model16.generate(
            torch.cat([loaded.token_ids, _ids(2, seed=1)], 1),
            **with_cache(model16, loaded),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == 95


def test_save_keeps_permissions_and_symlinks(saved, tmp_path):
    model = saved[0]
    cache = _prefill(model, _ids(60), recent_window=8)
    private = tmp_path / "private.nqkv"
    private.write_bytes(b"old")
    os.chmod(private, 0o600)
    nq.save_cache(cache, private)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert nq.load_cache(private, model).layers[0].seen == 60

    target = tmp_path / "real.nqkv"
    target.write_bytes(b"old")
    link = tmp_path / "link.nqkv"
    link.symlink_to(target.name)
    nq.save_cache(cache, link)
    assert link.is_symlink() and os.readlink(link) == target.name
    assert nq.load_cache(target, model).layers[0].seen == 60


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_token_ids_outside_uint32_are_refused(saved, tmp_path, bad):
    model = saved[0]
    ids = _ids(40)
    cache = _prefill(model, ids, recent_window=8)
    wrong = ids.clone()
    wrong[0, 3] = bad
    with pytest.raises(nq.NexusQuantError, match="token ids"):
        nq.save_cache(cache, tmp_path / "x.nqkv", token_ids=wrong)
    assert not (tmp_path / "x.nqkv").exists()


def test_positions_that_differ_between_heads_of_a_shared_layer_are_refused(tmp_path):
    """A transform-coded layer holds the same tokens in every KV head; a file whose positions
    say otherwise is corrupt, not silently read as head 0's."""
    model = make_tiny("llama")
    cache = _prefill(model, _ids(90), quality="high")
    path = tmp_path / "good.nqkv"
    nq.save_cache(cache, path)
    nq.load_cache(path, model)  # the file as written loads

    def swap_heads(d):
        seq = d["fine.seq"].copy()
        seq[:, 1, [0, 1]] = seq[:, 1, [1, 0]]  # still in range: only the heads disagree
        d["fine.seq"] = seq

    bad = _rewrite(read_nqkv(str(path)), tmp_path / "bad.nqkv", layer=swap_heads)
    with pytest.raises(nq.NexusQuantError, match="differs between KV heads"):
        nq.load_cache(bad, model)
