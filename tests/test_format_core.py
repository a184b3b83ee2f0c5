"""The Rust core's byte formats from Python: the at-rest code packer, the entropy coders and the
.nqkv container (nexusquant._core). Damaged input of every kind must raise NexusQuantError fast."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import nexusquant
from nexusquant import CorruptFileError, NexusQuantError, UnsupportedVersionError
from nexusquant import _core as core

FILE_HEADER = 64
SECTION_HEADER = 32


def kv_like(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    """Keys-like rows: a per-dimension bias plus noise correlated along tokens, float32 (n, d)."""
    rng = np.random.default_rng(seed)
    bias = rng.normal(0, 1.5, d)
    x = np.empty((n, d), np.float32)
    prev = np.zeros(d)
    for t in range(n):
        prev = 0.6 * prev + rng.normal(0, 1, d)
        x[t] = bias + prev
    return x


def codes_for(bits: int, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    codec = nexusquant.E8Codec(64, bits, seed=0)
    return codec.encode_arrays(kv_like(n, seed=seed))


def quick(fn, *args, limit: float = 1.0, **kw):
    """Call fn expecting NexusQuantError within `limit` seconds."""
    t = time.perf_counter()
    with pytest.raises(NexusQuantError):
        fn(*args, **kw)
    assert time.perf_counter() - t < limit


# ---------------------------------------------------------------------------------------------
# Packer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"layout": "raw", "coder": "zstd"},
        {"layout": "planes", "coder": "rans"},
        {"layout": "planes", "coder": "zstd-columns", "token_delta": True},
        {"layout": "lattice", "coder": "auto", "token_delta": True, "scale_delta": True},
        {"layout": "lattice", "coder": "raw"},
    ],
)
def test_pack_round_trip(bits, opts):
    codes, scales = codes_for(bits)
    packed = core.pack_codes(codes, scales, bits, **opts)
    assert isinstance(packed, bytes)
    c2, s2 = core.unpack_codes(packed)
    assert c2.dtype == np.uint8 and s2.dtype == np.uint16
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(s2, scales)
    info = core.packed_info(packed)
    assert info["bits"] == bits and info["rows"] == 300 and info["row_bytes"] == codes.shape[1]


def test_default_pack_is_smaller_than_raw():
    codes, scales = codes_for(2, n=2048)
    packed = core.pack_codes(codes, scales, 2)
    assert len(packed) < codes.nbytes + scales.nbytes


def test_pack_rejects_bad_arguments():
    codes, scales = codes_for(2)
    quick(core.pack_codes, codes, scales[:-1], 2)
    quick(core.pack_codes, codes, scales, 5)
    quick(core.pack_codes, codes[:, :15], scales, 2)  # 15 bytes is not whole 2-byte groups
    quick(core.pack_codes, codes, scales, 2, layout="zip")
    quick(core.pack_codes, codes, scales, 2, coder="lzma")


def test_unpack_damage_raises():
    codes, scales = codes_for(2, n=64)
    packed = core.pack_codes(codes, scales, 2)
    for cut in range(0, len(packed), 7):
        quick(core.unpack_codes, packed[:cut])
    rng = np.random.default_rng(1)
    for pos in rng.integers(0, len(packed), 200):
        b = bytearray(packed)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        quick(core.unpack_codes, bytes(b))
    quick(core.unpack_codes, b"PK\x03\x04" + bytes(100))
    quick(core.unpack_codes, b"")


def test_unpack_absurd_rows_fail_fast():
    codes, scales = codes_for(1, n=16)
    b = bytearray(core.pack_codes(codes, scales, 1))
    b[8:16] = struct.pack("<Q", 1 << 60)
    b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))
    quick(core.unpack_codes, bytes(b))
    quick(core.unpack_codes, bytes(b), max_bytes=2**63)
    # A small cap refuses a valid stream.
    quick(core.unpack_codes, core.pack_codes(codes, scales, 1), max_bytes=10)


# ---------------------------------------------------------------------------------------------
# Coders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coder", ["raw", "zstd", "rans"])
def test_coders_round_trip(coder):
    rng = np.random.default_rng(0)
    for data in [b"", b"a", bytes(1000), rng.geometric(0.3, 20000).astype(np.uint8).tobytes(), rng.bytes(5000)]:
        enc = core.entropy_encode(data, coder)
        assert core.entropy_decode(enc, coder, len(data)) == data


def test_rans_compresses_skewed_bytes():
    data = np.random.default_rng(0).geometric(0.5, 100_000).astype(np.uint8).tobytes()
    assert len(core.entropy_encode(data, "rans")) < 0.3 * len(data)


@pytest.mark.parametrize("coder", ["zstd", "rans"])
def test_coders_reject_damage_and_absurd_lengths(coder):
    data = np.random.default_rng(0).geometric(0.2, 5000).astype(np.uint8).tobytes()
    enc = core.entropy_encode(data, coder)
    quick(core.entropy_decode, enc, coder, 1 << 60, max_bytes=1 << 62)
    quick(core.entropy_decode, enc, coder, len(data) + 1, max_bytes=1 << 20)
    quick(core.entropy_decode, enc, coder, len(data), max_bytes=len(data) - 1)
    for cut in range(0, len(enc), 97):
        quick(core.entropy_decode, enc[:cut], coder, len(data))
    quick(core.entropy_decode, enc, "brotli", len(data))


# ---------------------------------------------------------------------------------------------
# .nqkv container
# ---------------------------------------------------------------------------------------------


def sections(n_layers: int = 3, tokens: int = 40):
    meta = json.dumps({"model": "SmolLM2-135M", "layers": n_layers, "bits": 2}).encode()
    toks = np.arange(tokens, dtype="<u4") * 7
    layers = []
    for i in range(n_layers):
        codes, scales = codes_for(2, n=tokens, seed=i)
        layers.append(
            {
                "k.packed": core.pack_codes(codes, scales, 2),
                "v.codes": codes,
                "v.scales": scales.view(np.float16),
                "positions": np.arange(tokens, dtype=np.int32),
                "window": np.zeros((0, 64), np.float32),
            }
        )
    return meta, toks, layers


def write_sample(path: Path, coder: str = "zstd") -> tuple:
    meta, toks, layers = sections()
    secs = [("META", meta), ("TOKN", toks.tobytes(), "raw")] + [("LAYR", lay, coder) for lay in layers]
    size = core.write_nqkv(path, secs)
    assert size == path.stat().st_size
    return meta, toks, layers


@pytest.mark.parametrize("coder", ["raw", "zstd", "rans"])
def test_nqkv_round_trip(tmp_path, coder):
    p = tmp_path / "cache.nqkv"
    meta, toks, layers = write_sample(p, coder)
    got = core.read_nqkv(p)
    assert [k for k, _ in got] == ["META", "TOKN", "LAYR", "LAYR", "LAYR"]
    assert json.loads(got[0][1]) == json.loads(meta)
    np.testing.assert_array_equal(np.frombuffer(got[1][1], "<u4"), toks)
    for (_, arrays), want in zip(got[2:], layers):
        assert set(arrays) == set(want)
        assert arrays["k.packed"] == want["k.packed"]
        for name in ["v.codes", "v.scales", "positions", "window"]:
            assert arrays[name].dtype == want[name].dtype
            np.testing.assert_array_equal(arrays[name], want[name])
    assert os.listdir(tmp_path) == ["cache.nqkv"]


def test_nqkv_reader_is_lazy_and_closes(tmp_path):
    p = tmp_path / "cache.nqkv"
    write_sample(p)
    with core.NqkvReader(str(p)) as r:
        assert r.version == core.NQKV_FORMAT_VERSION == 1
        assert r.section_count == 5
        kind, meta = next(r)
        assert kind == "META" and json.loads(meta)["layers"] == 3
        assert r.skip() == "TOKN"
        assert r.skip() == "LAYR"
        rest = list(r)
        assert [k for k, _ in rest] == ["LAYR", "LAYR"]
        assert r.skip() is None
    with pytest.raises(NexusQuantError):
        next(r)


def test_nqkv_write_rejects_bad_sections_and_keeps_old_file(tmp_path):
    p = tmp_path / "cache.nqkv"
    write_sample(p)
    before = p.read_bytes()
    bad = [
        [("TOKN", b"\0\0\0\0")],  # META must come first
        [("META", b"{}"), ("META", b"{}")],
        [("META", b"\xff\xfe")],  # not UTF-8
        [("meta", b"{}")],
        [("META", b"{}"), ("TOKN", b"abc")],  # not whole u32
        [("META", b"{}"), ("LAYR", {"x": np.zeros(3, np.complex64)})],
        [("META", b"{}"), ("LAYR", {"x": np.zeros(3, ">f4")})],
        [("META", b"{}"), ("LAYR", b"not a directory")],
        [("META", b"{}", "lzma")],
        [],
    ]
    for secs in bad:
        with pytest.raises(NexusQuantError):
            core.write_nqkv(p, secs)
        assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["cache.nqkv"]
    with pytest.raises(FileNotFoundError):  # an OS error is an OSError, not a NexusQuantError
        core.write_nqkv(tmp_path / "no-such-dir" / "x.nqkv", [("META", b"{}")])


def test_nqkv_non_contiguous_and_scalar_arrays(tmp_path):
    p = tmp_path / "c.nqkv"
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    core.write_nqkv(p, [("META", b"{}"), ("LAYR", {"a": a, "s": np.array(2.5)})])
    (_, _), (_, arrays) = core.read_nqkv(p)
    np.testing.assert_array_equal(arrays["a"], a)
    assert arrays["s"].shape == () and arrays["s"] == 2.5


def refresh_header_crc(b: bytearray) -> None:
    b[60:64] = struct.pack("<I", zlib.crc32(bytes(b[:60])))


def refresh_section_crc(b: bytearray, at: int) -> None:
    b[at + 28 : at + 32] = struct.pack("<I", zlib.crc32(bytes(b[at : at + 28])))


def test_nqkv_truncated_and_bit_flipped_raise(tmp_path):
    p = tmp_path / "cache.nqkv"
    write_sample(p)
    good = p.read_bytes()
    bad = tmp_path / "bad.nqkv"
    for cut in list(range(0, 200)) + list(range(200, len(good), 41)):
        bad.write_bytes(good[:cut])
        quick(core.read_nqkv, bad)
    rng = np.random.default_rng(0)
    positions = list(range(0, 200)) + [int(x) for x in rng.integers(0, len(good), 300)]
    for pos in positions:
        b = bytearray(good)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(b))
        quick(core.read_nqkv, bad)
    bad.write_bytes(good + b"\0")
    quick(core.read_nqkv, bad)


def test_nqkv_newer_version_says_so(tmp_path):
    p = tmp_path / "cache.nqkv"
    write_sample(p)
    b = bytearray(p.read_bytes())
    b[8:10] = struct.pack("<H", 2)
    refresh_header_crc(b)
    p.write_bytes(bytes(b))
    with pytest.raises(UnsupportedVersionError):
        core.read_nqkv(p)


def test_nqkv_absurd_sizes_fail_fast(tmp_path):
    p = tmp_path / "cache.nqkv"
    write_sample(p)
    good = p.read_bytes()
    for offset in (8, 16):  # stored length, decoded length of the first section
        b = bytearray(good)
        b[FILE_HEADER + offset : FILE_HEADER + offset + 8] = struct.pack("<Q", 1 << 60)
        refresh_section_crc(b, FILE_HEADER)
        p.write_bytes(bytes(b))
        quick(core.read_nqkv, p, limit=0.5)
        quick(core.read_nqkv, p, max_section_bytes=2**63, limit=0.5)
    b = bytearray(good)
    b[12:16] = struct.pack("<I", 1 << 30)  # section count
    refresh_header_crc(b)
    p.write_bytes(bytes(b))
    quick(core.read_nqkv, p, limit=0.5)
    # A valid file whose sections exceed the caller's cap.
    p.write_bytes(good)
    quick(core.read_nqkv, p, max_section_bytes=100)


def test_nqkv_foreign_and_missing_files(tmp_path):
    p = tmp_path / "x.nqkv"
    for content in [b"", b"hello world\n", b"\x89PNG\r\n\x1a\n" + bytes(100), b"\x89NQKV\r\n\x1a", os.urandom(4096)]:
        p.write_bytes(content)
        quick(core.read_nqkv, p)
        quick(core.NqkvReader, p)
    with pytest.raises(FileNotFoundError):
        core.read_nqkv(tmp_path / "missing.nqkv")
    with pytest.raises(FileNotFoundError):
        core.NqkvReader(tmp_path / "missing.nqkv")
    quick(core.read_nqkv, tmp_path)  # a directory


def test_nqkv_error_types(tmp_path):
    """Corrupt bytes and a newer version are NexusQuantError subclasses; the core never hides an
    OS error behind them."""
    assert issubclass(CorruptFileError, NexusQuantError) and issubclass(UnsupportedVersionError, NexusQuantError)
    p = tmp_path / "cache.nqkv"
    write_sample(p)
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError):
        core.read_nqkv(p)
    p.write_bytes(b"hello world\n" * 10)
    with pytest.raises(CorruptFileError):
        core.read_nqkv(p)


def test_core_reader_refuses_a_fifo_without_blocking(tmp_path):
    """``_core.NqkvReader`` itself checks the path before opening it (opening a FIFO for reading
    blocks until a writer comes). Run in a child process so that a regression fails, not hangs."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    code = (
        "import sys\n"
        "from nexusquant import _core, NexusQuantError\n"
        "for f in (_core.NqkvReader, _core.read_nqkv):\n"
        "    try:\n"
        "        f(sys.argv[1])\n"
        "    except NexusQuantError as e:\n"
        "        assert 'not a regular file' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_error_is_a_value_error():
    assert issubclass(NexusQuantError, ValueError)
    with pytest.raises(ValueError):
        core.unpack_codes(b"junk")
