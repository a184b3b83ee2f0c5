"""Saving and loading compressed caches as ``.nqkv`` files (format: docs/FORMAT.md).

    info = save_cache(cache, "prefix.nqkv")          # after a prefill with nexusquant
    cache = load_cache("prefix.nqkv", model)          # another process, another day
    with nexusquant_evict(model):
        out = model.generate(torch.cat([cache.token_ids, new_ids], 1), past_key_values=cache)

Rust owns the bytes (atomic writes, checksums, streaming reads, entropy packing of the E8 codes);
this module decides what goes in: the model's fingerprint, the settings, the prefix token ids and
every array a layer holds, so that loading gives back exactly the same tensors.
"""

from __future__ import annotations

import json
import math
import operator
import os
import stat
import threading
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ._core import (
    CorruptFileError,
    NexusQuantError,
    NqkvReader,
    UnsupportedVersionError,
    __version__,
    pack_codes,
    unpack_codes,
    write_nqkv,
)
from .architecture import attention_modules, model_fingerprint
from .cache import LAYER_TENSOR_FIELDS, NexusQuantCache, NexusQuantLayer, compression_stats
from .presets import CompressionSettings
from .rope import RopeFormula, RopeTable
from .tiers import TIER_NAMES, QuantizedTensor, TransformCodedKeys
from .transform import KeyTransformCode, code_bytes

__all__ = ["save_cache", "load_cache", "inspect_file", "model_fingerprint"]

FORMAT_NAME = "nexusquant-kv-cache"
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of a tensor (bf16 as uint16 bits, which the file format stores as such)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _torch(a: np.ndarray, dtype: Optional[torch.dtype], device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16) if t.dtype == torch.int16 else t.view(torch.int16).view(torch.bfloat16)
    return t.to(device)


# META's "settings": the file's names for the compression settings, written out here rather than
# taken from the dataclass, so that renaming a CompressionSettings field cannot silently change the
# format (tests/test_format_doc.py holds these equal to the dataclass's fields and to FORMAT.md).
FILE_SETTINGS_KEYS = (
    "evict",
    "demote",
    "key_bits",
    "value_bits",
    "coarse_key_bits",
    "coarse_value_bits",
    "sink_tokens",
    "recent_window",
    "block",
    "scorer",
    "score_window",
    "pool_kernel",
    "key_domain",
    "key_codec",
    "key_rate",
    "sliding_key_bits",
    "global_key_rate",
    "key_attention_share",
    "value_refine_share",
    "value_refine_bits",
    "generated_value_bits",
    "seed",
    "center",
)


# Tiers the first version-1 files were written without: absent reads as empty.
_LATER_TIERS = ("generated",)


def _tier_meta(layer_meta: dict[str, Any], name: str) -> Any:
    """A layer's META entry for tier ``name`` (``{"length": 0}`` for a later tier a file lacks)."""
    if name in _LATER_TIERS and name not in layer_meta:
        return {"length": 0}
    return layer_meta.get(name)


# Settings added after files of this format version were first written, with the value such files
# meant by leaving them out: written only when they differ from it, so a file that does not use a
# later knob stays readable by the versions before it (and a version-1 file saves back unchanged).
_LATER_SETTINGS: dict[str, Any] = {
    "sliding_key_bits": None,
    "global_key_rate": None,
    "key_attention_share": 0.0,
    "value_refine_share": 0.0,
    "value_refine_bits": 2,
    "generated_value_bits": None,
}


def _settings_meta(settings: CompressionSettings) -> dict[str, Any]:
    return {
        key: getattr(settings, key)
        for key in FILE_SETTINGS_KEYS
        if key not in _LATER_SETTINGS or getattr(settings, key) != _LATER_SETTINGS[key]
    }


def _settings_from_meta(saved: dict[str, Any]) -> CompressionSettings:
    """Settings of a file; a key this version does not know reads as a newer version's file (a key
    the file lacks takes the default, which is what files written before it was added used)."""
    unknown = sorted(set(saved) - set(FILE_SETTINGS_KEYS))
    if unknown:
        raise UnsupportedVersionError(f"cache file settings are not understood by this version: {unknown}")
    return CompressionSettings(**saved)


def _pack_tier_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[bytes, np.ndarray]:
    """Every (batch, head) stream of a tier packed losslessly; returns the bytes and stream offsets."""
    c = _np(codes)
    s = _np(scales).view(np.uint16)
    b, h = s.shape[0], s.shape[1]
    blobs = [
        pack_codes(np.ascontiguousarray(c[i, j]), np.ascontiguousarray(s[i, j]), bits)
        for i in range(b)
        for j in range(h)
    ]
    offsets = np.zeros(len(blobs) + 1, dtype=np.uint64)
    offsets[1:] = np.cumsum([len(x) for x in blobs])
    return b"".join(blobs), offsets


def _unpack_tier_codes(blob: bytes, offsets: np.ndarray, shape: tuple[int, int, int], code_bytes: int, device):
    b, h, t = shape
    codes, scales = [], []
    if (
        len(offsets) != b * h + 1
        or int(offsets[0]) != 0
        or int(offsets[-1]) != len(blob)
        or bool(np.any(np.diff(offsets.astype(np.int64)) < 0))
    ):
        raise NexusQuantError("corrupt cache file: code stream offsets do not match the stored streams")
    # Each stream holds t vectors: its codes and scales decode to exactly this many bytes, so no
    # stream may expand further (a few bytes of a crafted stream must not become gigabytes).
    most = t * (code_bytes + 2)
    for k in range(b * h):
        c, s = unpack_codes(blob[int(offsets[k]) : int(offsets[k + 1])], max_bytes=most)
        if s.shape[0] != t or c.shape != (t, code_bytes):
            raise NexusQuantError(
                f"corrupt cache file: a code stream holds {tuple(c.shape)} codes, expected {(t, code_bytes)}"
            )
        codes.append(c)
        scales.append(s)
    c = np.stack(codes).reshape(b, h, t, code_bytes)
    s = np.stack(scales).reshape(b, h, t).view(np.int16)
    return torch.from_numpy(c).to(device), torch.from_numpy(s).to(device)


def _transform_arrays(prefix: str, rows: list[list[KeyTransformCode]]) -> dict[str, np.ndarray]:
    """Transform-coded keys, per batch row ``r``: ``{prefix}.{r}.{mean,basis,basis_scale,step,bits,codes}``
    (the codes of every append of a row share one basis, so they are stored as one array)."""
    out = {}
    for r, row in enumerate(rows):
        first = row[0]
        for name in KeyTransformCode._FIELDS:
            t = torch.cat([c.codes for c in row], 0) if name == "codes" else getattr(first, name)
            out[f"{prefix}.{r}.{name}"] = _np(t)
    return out


def _restore_transform(
    arrays: dict[str, Any], prefix: str, b: int, f: int, n: int, take_array, where: str, device
) -> list[list[KeyTransformCode]]:
    """Transform-coded keys of ``b`` rows of ``n`` tokens and ``f`` = heads x head_dim, each array
    checked against the others and the model (widths 1–8, steps positive and finite)."""
    rows = []
    for r in range(b):
        p = f"{prefix}.{r}"
        bits = arrays.get(f"{p}.bits")
        k = bits.shape[0] if isinstance(bits, np.ndarray) and bits.ndim == 1 else -1
        if not 0 <= k <= f:
            raise _corrupt(f"{where}: {p}.bits is missing or holds more components than {f}")
        bits = take_array(f"{p}.bits", (k,), (np.dtype(np.uint8),))
        if k and (int(bits.min()) < 1 or int(bits.max()) > 8):
            raise _corrupt(f"{where}: {p}.bits holds widths outside 1..8")
        step = take_array(f"{p}.step", (k,), (np.dtype(np.float32),))
        if k and not (np.isfinite(step).all() and (step > 0).all()):
            raise _corrupt(f"{where}: {p}.step holds a step that is not a positive number")
        arrs = {
            "mean": take_array(f"{p}.mean", (f,), (np.dtype(np.float16),)),
            "basis": take_array(f"{p}.basis", (f, k), (np.dtype(np.int8),)),
            "basis_scale": take_array(f"{p}.basis_scale", (k,), (np.dtype(np.float16),)),
            "step": step,
            "bits": bits,
            "codes": take_array(
                f"{p}.codes", (n, code_bytes(torch.from_numpy(bits.astype(np.int64)))), (np.dtype(np.uint8),)
            ),
        }
        tensor = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in arrs.items()}
        rows.append(
            [
                KeyTransformCode(
                    mean=tensor["mean"],
                    basis=tensor["basis"],
                    basis_scale=tensor["basis_scale"],
                    step=tensor["step"],
                    bits=tensor["bits"],
                    codes=tensor["codes"],
                )
            ]
        )
    return rows


def _layer_arrays(layer: NexusQuantLayer) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "seen": layer.seen,
        "first_compression_done": layer.first_compression_done,
        "dropped": layer.dropped,
        "prompt_tokens": layer.prompt_tokens,
        "sliding_window": layer.sliding_window,
        "record_positions": layer.record_positions,
        "rope_key": layer.rope_key,
    }
    if not layer.is_initialized:
        meta["initialized"] = False
        return arrays, meta
    meta.update(
        initialized=True,
        dtype=str(layer.dtype).replace("torch.", ""),
        batch=layer.batch,
        heads=layer.heads,
        head_dim=layer.head_dim,
    )
    state = layer.state_dict()
    for name in LAYER_TENSOR_FIELDS:
        if state[name] is not None:
            arrays[name] = _np(state[name])
    for tier_name, tier in layer.tiers.items():
        tier_state = tier.state_dict()
        if tier_state["length"] == 0 and tier_name in _LATER_TIERS:
            continue  # absent reads as empty: a cache that never used it writes what version 1 wrote
        meta[tier_name] = {"length": tier_state["length"]}
        if tier_state["length"] == 0:
            continue
        for part in ("k", "v"):
            name = f"{tier_name}.{part}"
            if f"{part}.rows" in tier_state:
                arrays.update(_transform_arrays(f"{name}.tc", tier_state[f"{part}.rows"]))
            elif f"{part}.raw" in tier_state:
                arrays[f"{name}.raw"] = _np(tier_state[f"{part}.raw"])
            else:
                blob, offsets = _pack_tier_codes(
                    tier_state[f"{part}.codes"], tier_state[f"{part}.scales"], tier_state[f"{part}.bits"]
                )
                arrays[f"{name}.packed"] = blob
                arrays[f"{name}.offsets"] = offsets
        if tier_state.get("v.ref_idx") is not None:
            meta[tier_name]["value_refined"] = int(tier_state["v.ref_idx"].shape[2])
            for name in QuantizedTensor._REFINEMENT:
                arrays[f"{tier_name}.v.{name}"] = _np(tier_state[f"v.{name}"])
        for name in ("seq", "valid"):
            if tier_state[name] is not None:
                arrays[f"{tier_name}.{name}"] = _np(tier_state[name])
    return arrays, meta


def save_cache(cache: Any, path: Union[str, Path], token_ids: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Write a compressed cache to ``path`` atomically.

    Parameters
    ----------
    cache : NexusQuantCache or a transformers Cache whose layers nexusquant compressed
    path : str or Path
    token_ids : torch.Tensor, optional
        ``(B, N)`` ids of the cached tokens; by default the ids ``nexusquant_evict`` recorded.

    Returns
    -------
    dict
        ``file_bytes``, ``resident_bytes`` (what the cache holds in memory), ``fp16_bytes`` and both
        ratios against fp16.
    """
    layers = list(cache.layers)
    if not layers or not all(isinstance(l, NexusQuantLayer) for l in layers):
        raise NexusQuantError("save_cache needs a cache compressed by nexusquant (every layer a NexusQuantLayer)")
    fingerprint = getattr(cache, "fingerprint", None)
    if fingerprint is None:
        raise NexusQuantError(
            "this cache does not know its model; create it with NexusQuantCache(model.config) or nexusquant_evict"
        )
    ids = token_ids if token_ids is not None else getattr(cache, "token_ids", None)
    seen = layers[0].seen
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise NexusQuantError("token_ids must be an integer tensor of shape (batch, tokens)")
        if ids.shape[-1] != seen:
            raise NexusQuantError(f"token_ids hold {ids.shape[-1]} tokens but the cache holds {seen}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
            # The file stores u32 ids: anything else would come back as another token.
            raise NexusQuantError(
                f"token ids must lie in [0, 2**32) to be saved; got {int(ids.min())}..{int(ids.max())}"
            )
    settings: CompressionSettings = layers[0].settings
    layer_metas, layer_sections = [], []
    for layer in layers:
        arrays, meta = _layer_arrays(layer)
        layer_metas.append(meta)
        layer_sections.append(("LAYR", arrays))
    rope_tables = getattr(cache, "rope_tables", {}) or {}
    rope_meta: dict[str, dict[str, Any]] = {}
    rope_arrays: dict[str, Any] = {}
    for key, table in rope_tables.items():
        if table.formula is not None and table.positions is not None:
            # Positions and the frequencies that give the angles (rope.RopeFormula): the angles
            # are recomputed on load, 4 bytes a token instead of the rows.
            rope_meta[str(key)] = {
                "dtype": str(table.formula.dtype).replace("torch.", ""),
                "formula": {"scaling": table.formula.scaling},
            }
            rope_arrays[f"{key}.positions"] = _np(table.positions.to(torch.int32))
            rope_arrays[f"{key}.inv_freq"] = _np(table.formula.inv_freq.to(torch.float32))
        elif table.cos is not None:
            rope_meta[str(key)] = {"dtype": str(table.cos.dtype).replace("torch.", "")}
            if table.half:
                rope_meta[str(key)]["half"] = True  # absent: the arrays hold whole rows
            rope_arrays[f"{key}.cos"] = _np(table.cos)
            rope_arrays[f"{key}.sin"] = _np(table.sin)
    stats = compression_stats(cache)
    meta = {
        "format": FORMAT_NAME,
        "nexusquant_version": __version__,
        "fingerprint": fingerprint,
        "settings": _settings_meta(settings),
        "layers": layer_metas,
        "rope_tables": rope_meta,
        "token_ids_shape": None if ids is None else list(ids.shape),
        "resident_bytes": stats["nbytes"],
        "fp16_bytes": stats["fp16_nbytes"],
    }
    sections: list[tuple] = [("META", json.dumps(meta, separators=(",", ":")).encode())]
    if ids is not None:
        sections.append(("TOKN", _np(ids.to(torch.int64)).astype("<u4").tobytes()))
    sections += layer_sections
    if rope_arrays:
        sections.append(("LAYR", rope_arrays))
    size = _write_keeping_target(Path(path), sections)
    return {
        "file_bytes": size,
        "resident_bytes": stats["nbytes"],
        "fp16_bytes": stats["fp16_nbytes"],
        "file_ratio": stats["fp16_nbytes"] / size,
        "resident_ratio": stats["ratio"],
    }


_umask_lock = threading.Lock()


def _write_keeping_target(path: Path, sections: list[tuple]) -> int:
    """``write_nqkv`` (a temporary file renamed over the target), keeping what the target was:
    through a symlink the link stays and its target is replaced; an existing file keeps its
    permission bits (the file holds the prompt's token ids: a 0600 file must not become 0644)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode: Optional[int] = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    if mode is None:
        return write_nqkv(str(path), sections)
    # The temporary file is created under the umask: narrowing the umask to the old mode's
    # complement creates it with no more access than the old file had, so there is no moment when
    # the new file is readable by more people than the old one. The umask is process-wide: other
    # threads creating files meanwhile get files that are at most more private.
    with _umask_lock:
        old = os.umask(0o777 & ~mode)
        try:
            size = write_nqkv(str(path), sections)
        finally:
            os.umask(old)
    os.chmod(path, mode)
    return size


# META is JSON of a few hundred bytes per layer; a section that claims more before the shapes are
# known is refused without being decoded.
_META_MAX_BYTES = 64 << 20
# Array directory overhead per array (name, dtype, shape, offsets; FORMAT.md) and per section.
_ARRAY_OVERHEAD = 256 + 8 * 8 + 32
# What a packed code stream may hold beyond its codes and scales (its header and tables).
_STREAM_SLACK = 4096
# numpy dtype each kind of array is stored as (bfloat16 travels as its uint16 bits).
_NP_FLOAT = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


def _corrupt(message: str) -> CorruptFileError:
    return CorruptFileError(f"corrupt cache file: {message}")


def _open_reader(path: Path, max_section_bytes: int) -> NqkvReader:
    """An ``NqkvReader`` on a regular file only: opening a FIFO would block until a writer comes.
    A missing or unreadable file raises the ``OSError`` that ``open`` would (``FileNotFoundError``,
    ``PermissionError``)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NexusQuantError(f"{path} is not a regular file")
    return NqkvReader(str(path), max_section_bytes=max(1, min(int(max_section_bytes), 2**63 - 1)))


def _read_meta(reader) -> dict[str, Any]:
    first = next(iter(reader), None)
    if first is None or first[0] != "META":
        raise CorruptFileError("not a nexusquant cache file: it does not start with a META section")
    try:
        meta = json.loads(bytes(first[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _corrupt(f"META is not valid JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CorruptFileError("not a nexusquant cache file (META names another format)")
    _check_meta(meta)
    return meta


def _int(value: Any, what: str, low: int = 0, high: int = 2**62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _corrupt(f"{what} is {value!r}, expected an integer in [{low}, {high}]")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _corrupt(f"{what} is {type(value).__name__}, expected an object")
    return value


def _check_meta(meta: dict[str, Any]) -> None:
    """The shape of META (docs/FORMAT.md): every key a reader uses is present with its type, and
    the layers agree with each other, so that nothing later fails with a KeyError or TypeError."""
    _dict(meta.get("fingerprint"), "META fingerprint")
    _dict(meta.get("settings"), "META settings")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _corrupt("META layers is not a non-empty list")
    rope = _dict(meta.get("rope_tables", {}), "META rope_tables")
    for key, entry in rope.items():
        if not key.lstrip("-").isdigit() or _dict(entry, f"rope table {key}").get("dtype") not in _TORCH:
            raise _corrupt(f"rope table {key!r} is not understood")
    shape = meta.get("token_ids_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 2):
        raise _corrupt(f"token_ids_shape is {shape!r}, expected [batch, tokens]")
    seen = batch = None
    for i, layer in enumerate(layers):
        layer = _dict(layer, f"META layer {i}")
        for key in ("seen", "dropped", "prompt_tokens"):
            _int(layer.get(key), f"layer {i} {key}")
        if not isinstance(layer.get("first_compression_done"), bool):
            raise _corrupt(f"layer {i} first_compression_done is not a boolean")
        if layer.get("rope_key") is not None:
            _int(layer["rope_key"], f"layer {i} rope_key", -1, 2**31)
        if seen is None:
            seen = layer["seen"]
        elif layer["seen"] != seen:
            raise _corrupt(f"layer {i} has seen {layer['seen']} tokens, layer 0 {seen}")
        if not layer.get("initialized"):
            continue
        if layer.get("dtype") not in _TORCH:
            raise _corrupt(f"layer {i} dtype {layer.get('dtype')!r} is not one of {sorted(_TORCH)}")
        b = _int(layer.get("batch"), f"layer {i} batch", 1, 2**31)
        _int(layer.get("heads"), f"layer {i} heads", 1, 2**16)
        _int(layer.get("head_dim"), f"layer {i} head_dim", 1, 2**16)
        if batch is None:
            batch = b
        elif b != batch:
            raise _corrupt(f"layer {i} has batch {b}, an earlier layer {batch}")
        for tier in TIER_NAMES:
            _int(
                _dict(_tier_meta(layer, tier), f"layer {i} {tier}").get("length"),
                f"layer {i} {tier} length",
                0,
                seen or 0,
            )
    if shape is not None:
        _int(shape[0], "token_ids_shape[0]", 1, 2**31)
        _int(shape[1], "token_ids_shape[1]", 0, 2**62)
        if shape[1] != seen or (batch is not None and shape[0] != batch):
            raise _corrupt(f"token_ids_shape {shape} does not match the layers (batch {batch}, {seen} tokens)")


def _section_bound(meta: dict[str, Any]) -> int:
    """The most bytes any section after META may decode to, from the shapes META records: a
    layer's full-precision tokens (at most every token seen), its tiers' codes or raw vectors, and
    the small per-token arrays; the token ids; the rotary tables. A file whose section claims more
    is refused before that section is decoded."""
    bound = 1 << 16
    shape = meta.get("token_ids_shape")
    if shape is not None:
        bound = max(bound, 4 * shape[0] * shape[1])
    rope_bytes = 0
    for layer in meta["layers"]:
        if not layer.get("initialized"):
            continue
        b, h, d, n = layer["batch"], layer["heads"], layer["head_dim"], layer["seen"]
        item = _TORCH[layer["dtype"]].itemsize
        per_token = b * h * (2 * d * item + 4 + 1)  # K and V, sequence index, validity
        tiers = sum(_tier_meta(layer, t)["length"] for t in TIER_NAMES)
        # Tiers at their widest: 16-bit raw vectors or packed streams no larger than raw 4-bit codes.
        per_tier_token = b * h * (2 * max(d * item, d // 2 + 8 + 2) + 4 + 1)
        streams = 4 * (b * h + 1) * (8 + _STREAM_SLACK)
        # Transform-coded keys: per row an int8 basis of at most (h d)^2 bytes and its vectors.
        streams += b * ((h * d) ** 2 + 16 * h * d + 6 * _ARRAY_OVERHEAD)
        bound = max(
            bound, n * per_token + tiers * per_tier_token + 2 * b * h * d * item + streams + 32 * _ARRAY_OVERHEAD
        )
        rope_bytes = max(rope_bytes, 2 * b * n * d * 4)
    rope_bytes *= max(1, len(meta.get("rope_tables", {})))
    return max(bound, rope_bytes + 8 * _ARRAY_OVERHEAD)


def _check_fingerprint(saved: dict[str, Any], model: Any) -> None:
    current = json.loads(json.dumps(model_fingerprint(model.config), default=str))
    diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        details = "; ".join(f"{k}: file {saved.get(k)!r} vs model {current.get(k)!r}" for k in diff[:4])
        raise NexusQuantError(f"the cache file was made for a different model ({details})")


def _layer_placement(model: Any, n: int) -> list[tuple[torch.device, torch.dtype]]:
    """Device and floating dtype of each layer's attention weights (the model's dtype where the
    weights are not floating, e.g. quantized)."""
    mods = sorted(attention_modules(model), key=operator.attrgetter("layer_idx"))
    default_dtype = getattr(model, "dtype", torch.float32)
    out = []
    for i in range(n):
        m = next((m for m in mods if m.layer_idx == i), None)
        p = next(m.parameters()) if m is not None else next(model.parameters())
        out.append((p.device, p.dtype if p.dtype.is_floating_point else default_dtype))
    return out


def _array(arrays: dict[str, Any], name: str, shape: tuple, dtypes: tuple, where: str) -> np.ndarray:
    a = arrays.get(name)
    if not isinstance(a, np.ndarray) or a.dtype not in dtypes or tuple(a.shape) != tuple(shape):
        got = (
            f"{a.dtype} {tuple(a.shape)}"
            if isinstance(a, np.ndarray)
            else ("missing" if a is None else type(a).__name__)
        )
        want = " or ".join(str(d) for d in dtypes)
        raise _corrupt(f"{where}: array {name!r} is {got}, expected {want} {tuple(shape)}")
    return a


def _positions(a: np.ndarray, seen: int, where: str, name: str) -> None:
    if a.size and (int(a.min()) < 0 or int(a.max()) >= max(seen, 1)):
        raise _corrupt(f"{where}: {name} holds sequence indices outside [0, {seen})")


def _restore_layer(
    layer: NexusQuantLayer,
    meta: dict[str, Any],
    arrays: Any,
    device,
    dtype: torch.dtype,
    model_shape: tuple[int, int],
    where: str,
) -> None:
    """Check every array of one layer against META and the model, then set the layer's state.

    Full-precision arrays are converted to ``dtype`` (the model's), so that a cache saved from a
    float32 model continues in a bfloat16 one; the codes do not depend on the dtype.
    """
    if not isinstance(arrays, dict):
        raise _corrupt(f"{where} is not an array directory")
    layer.load_state_dict({name: meta.get(name) for name in NexusQuantLayer.STATE_SCALARS})
    if not meta.get("initialized"):
        if arrays:
            raise _corrupt(f"{where} is not initialized but holds arrays {sorted(arrays)}")
        return
    saved = _NP_FLOAT[meta["dtype"]]
    b, h, d, seen = meta["batch"], meta["heads"], meta["head_dim"], meta["seen"]
    if (h, d) != model_shape:
        raise _corrupt(f"{where} has {h} KV heads of {d} dimensions, the model {model_shape[0]} of {model_shape[1]}")
    known = set()

    def take(name: str, shape: tuple, dtypes: tuple) -> Optional[np.ndarray]:
        if name not in arrays:
            return None
        known.add(name)
        return _array(arrays, name, shape, dtypes, where)

    def need(name: str, shape: tuple, dtypes: tuple) -> np.ndarray:
        known.add(name)
        return _array(arrays, name, shape, dtypes, where)

    # Full-precision sinks and window: their lengths come from the arrays, checked against each other.
    s_len = (
        arrays["sink_k"].shape[2] if isinstance(arrays.get("sink_k"), np.ndarray) and arrays["sink_k"].ndim == 4 else 0
    )
    w_len = arrays["win_k"].shape[2] if isinstance(arrays.get("win_k"), np.ndarray) and arrays["win_k"].ndim == 4 else 0
    tier_lengths = {name: _tier_meta(meta, name)["length"] for name in TIER_NAMES}
    held = s_len + w_len + sum(tier_lengths.values())
    if held > seen:
        raise _corrupt(f"{where} holds more tokens ({held}) than it has seen ({seen})")
    vec = (saved,)
    values: dict[str, Optional[np.ndarray]] = {}
    has_sinks = "sink_k" in arrays
    if has_sinks:
        values["sink_k"] = need("sink_k", (b, h, s_len, d), vec)
        values["sink_v"] = need("sink_v", (b, h, s_len, d), vec)
        values["sink_seq"] = take("sink_seq", (b, h, s_len), (np.dtype(np.int32),))
        values["sink_valid"] = take("sink_valid", (b, h, s_len), (np.dtype(np.bool_),))
        if values["sink_seq"] is not None:
            _positions(values["sink_seq"], seen, where, "sink_seq")
    if "win_k" in arrays:
        values["win_k"] = need("win_k", (b, h, w_len, d), vec)
        values["win_v"] = need("win_v", (b, h, w_len, d), vec)
        values["win_valid"] = need("win_valid", (b, w_len), (np.dtype(np.bool_),))
    if "k_center" in arrays or "v_center" in arrays:
        values["k_center"] = need("k_center", (b, h, 1, d), vec)
        values["v_center"] = need("v_center", (b, h, 1, d), vec)
    for name in LAYER_TENSOR_FIELDS:
        if name.startswith("sink") and not has_sinks and name in arrays:
            raise _corrupt(f"{where}: {name} without sink_k")
    if layer.needs_positions and has_sinks and values.get("sink_seq") is None and s_len:
        raise _corrupt(f"{where}: sink_seq is missing (this layer needs token positions)")

    probe = torch.empty(b, h, 0, d, dtype=dtype, device=device)
    layer.lazy_initialization(probe, probe)
    tier_state = []
    shared_heads = layer.heads_share_tokens()
    for tier_name, n in tier_lengths.items():
        tier = layer.tiers[tier_name]
        if n == 0:
            continue
        parts: list[tuple[str, Any]] = []
        for part, qt in (("k", tier.keys), ("v", tier.values)):
            if isinstance(qt, TransformCodedKeys):
                parts.append(
                    (
                        "transform",
                        _restore_transform(arrays, f"{tier_name}.{part}.tc", b, h * d, n, need, where, device),
                    )
                )
            elif qt.codec is None:
                parts.append(("raw", need(f"{tier_name}.{part}.raw", (b, h, n, d), vec)))
            else:
                packed = arrays.get(f"{tier_name}.{part}.packed")
                known.add(f"{tier_name}.{part}.packed")
                if not isinstance(packed, bytes):
                    raise _corrupt(f"{where}: {tier_name}.{part}.packed is missing")
                offsets = need(f"{tier_name}.{part}.offsets", (b * h + 1,), (np.dtype(np.uint64),))
                codes, scales = _unpack_tier_codes(packed, offsets, (b, h, n), qt.codec.code_bytes_per_vector, device)
                parts.append(("codes", (codes, scales)))
        seq = take(f"{tier_name}.seq", (b, h, n), (np.dtype(np.int16), np.dtype(np.int32)))
        if seq is not None:
            _positions(seq, seen, where, f"{tier_name}.seq")
            if shared_heads and not bool((seq == seq[:, :1]).all()):
                raise _corrupt(f"{where}: {tier_name}.seq differs between KV heads, which hold the same tokens here")
        elif layer.needs_positions:
            raise _corrupt(f"{where}: {tier_name}.seq is missing (this layer needs token positions)")
        valid = take(f"{tier_name}.valid", (b, h, n), (np.dtype(np.bool_),))
        refinement = _refinement(tier, _tier_meta(meta, tier_name), f"{tier_name}.v", b, h, n, need, where)
        tier_state.append((tier, n, parts, seq, valid, refinement))
    unknown = set(arrays) - known
    if unknown:
        raise _corrupt(f"{where} holds arrays this version does not know: {sorted(unknown)}")

    def fp(a: np.ndarray) -> torch.Tensor:
        return _torch(a, _TORCH[meta["dtype"]], device).to(dtype)

    layer.load_state_dict(
        {
            name: fp(a) if name.endswith(("_k", "_v", "center")) else _torch(a, None, device)
            for name, a in values.items()
            if a is not None
        }
    )
    for tier, n, parts, seq, valid, refinement in tier_state:
        seq_t: Optional[torch.Tensor] = None
        if seq is not None and shared_heads:
            # The file holds positions per head; the layer holds them once (a broadcast view
            # is what Tier keeps one row of), as it did when the cache was saved.
            seq_t = _torch(np.ascontiguousarray(seq[:, :1]), None, device).expand(seq.shape)
        elif seq is not None:
            seq_t = _torch(seq, None, device)
        state: dict[str, Any] = {
            "length": n,
            "seq": seq_t,
            "valid": None if valid is None else _torch(valid, None, device),
        }
        state.update((f"v.{name}", _torch(a, None, device)) for name, a in refinement.items())
        for (kind, data), part in zip(parts, ("k", "v")):
            if kind == "raw":
                state[f"{part}.raw"] = fp(data)
            elif kind == "transform":
                state[f"{part}.rows"] = data
            else:
                state[f"{part}.codes"], state[f"{part}.scales"] = data
        tier.load_state_dict(state)


def _refinement(tier: Any, tier_meta: dict, prefix: str, b: int, h: int, n: int, need, where: str) -> dict:
    """A tier's value refinement arrays (``ref_idx``, ``ref_codes``, ``ref_scales``), checked
    against the settings (their codec's width) and the tier's length; empty where it has none."""
    count = tier_meta.get("value_refined")
    if count is None:
        return {}
    codec = tier.values.refine_codec
    if codec is None or not isinstance(count, int) or not 0 < count <= n:
        raise _corrupt(f"{where}: {prefix} holds a value refinement its settings do not make ({count!r})")
    idx = need(f"{prefix}.ref_idx", (b, h, count), (np.dtype(np.int16), np.dtype(np.int32)))
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise _corrupt(f"{where}: {prefix}.ref_idx points outside the tier's {n} tokens")
    return {
        "ref_idx": idx,
        "ref_codes": need(f"{prefix}.ref_codes", (b, h, count, codec.code_bytes_per_vector), (np.dtype(np.uint8),)),
        "ref_scales": need(f"{prefix}.ref_scales", (b, h, count), (np.dtype(np.int16),)),
    }


# What a checksum-valid file with bad contents could still raise below: each becomes a
# CorruptFileError (a NexusQuantError).
_CONTENT_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError, OverflowError)


def load_cache(path: Union[str, Path], model: Any) -> NexusQuantCache:
    """Read a cache saved by :func:`save_cache`, for ``model`` (its fingerprint must match).

    Each layer's tensors go to the device of that layer's attention weights, so a model split
    over several GPUs gets each layer's codes on its own GPU, and full-precision parts take the
    model's dtype (a cache saved from a float32 model continues in a bfloat16 one). Every array is
    checked against META and the model. The returned cache carries the prefix token ids as
    ``cache.token_ids``; ``generate`` continues after them.

    Raises
    ------
    CorruptFileError
        A truncated, corrupted or foreign file, or one whose contents do not fit together.
    UnsupportedVersionError
        A file written by a newer format version.
    NexusQuantError
        (the base of both) A file of another model, or one that is not a regular file.
    OSError
        The file cannot be read (``FileNotFoundError``, ``PermissionError``, ...).
    """
    path = Path(path)
    try:
        return _load_cache(path, model)
    except NexusQuantError:
        raise
    except _CONTENT_ERRORS as e:
        raise _corrupt(f"{path}: {type(e).__name__}: {e}") from None


def _load_cache(path: Path, model: Any) -> NexusQuantCache:
    with _open_reader(path, _META_MAX_BYTES) as reader:
        meta = _read_meta(reader)
    _check_fingerprint(_dict(meta["fingerprint"], "META fingerprint"), model)
    settings = _settings_from_meta(meta["settings"])
    # With the model itself, a pre-RoPE cache records the angles of the tokens it goes on to hold.
    cache = NexusQuantCache(model if hasattr(model, "forward") else model.config, preset=settings)
    n_layers = len(cache.layers)
    if len(meta["layers"]) != n_layers:
        raise NexusQuantError(f"cache file holds {len(meta['layers'])} layers, the model has {n_layers}")
    fp = meta["fingerprint"]
    model_shape = (fp.get("num_key_value_heads"), fp.get("head_dim"))
    placement = _layer_placement(model, n_layers)
    token_ids = None
    layer_i = 0
    rope_arrays = None
    # The file is opened again with every section bounded by what META's shapes allow.
    with _open_reader(path, _section_bound(meta)) as reader:
        if reader.skip() != "META":
            raise NexusQuantError(f"{path} changed while it was being read")
        for kind, payload in reader:
            if kind == "TOKN":
                shape = meta.get("token_ids_shape")
                if shape is None or token_ids is not None or len(payload) != 4 * shape[0] * shape[1]:
                    raise _corrupt("token ids do not match their recorded shape")
                ids = np.frombuffer(bytes(payload), dtype="<u4").astype(np.int64).reshape(shape)
                vocab = fp.get("vocab_size")
                if isinstance(vocab, int) and ids.size and int(ids.max()) >= vocab:
                    raise _corrupt(f"a token id ({int(ids.max())}) is outside the model's vocabulary of {vocab}")
                token_ids = torch.from_numpy(ids)
            elif kind == "LAYR":
                if layer_i < n_layers:
                    device, dtype = placement[layer_i]
                    layer = cache.layers[layer_i]
                    assert isinstance(layer, NexusQuantLayer)  # load_cache made the cache
                    _restore_layer(
                        layer,
                        meta["layers"][layer_i],
                        payload,
                        device,
                        dtype,
                        model_shape,
                        f"layer {layer_i}",
                    )
                    layer_i += 1
                elif rope_arrays is None:
                    rope_arrays = payload
                else:
                    raise _corrupt("more LAYR sections than layers")
        if layer_i != n_layers:
            raise CorruptFileError(f"truncated cache file: {layer_i} of {n_layers} layers present")
    if meta.get("token_ids_shape") is not None and token_ids is None:
        raise _corrupt("the token ids recorded in META are missing")
    seen = meta["layers"][0]["seen"]
    rope_meta = meta.get("rope_tables", {})
    if rope_arrays is not None and not isinstance(rope_arrays, dict):
        raise _corrupt("the rotary angles are not an array directory")
    expected = {
        f"{k}.{part}"
        for k, entry in rope_meta.items()
        for part in (("positions", "inv_freq") if "formula" in entry else ("cos", "sin"))
    }
    if rope_arrays is not None and set(rope_arrays) != expected:
        raise _corrupt(f"rotary angle arrays {sorted(rope_arrays)} do not match META's {sorted(expected)}")
    for key in rope_meta:
        if rope_arrays is None:
            raise _corrupt("rotary angles are missing")
        if "formula" in rope_meta[key]:
            cache.rope_tables[int(key)] = _formula_table(key, rope_meta[key], rope_arrays, seen, placement[0])
            continue
        saved_np = _NP_FLOAT[rope_meta[key]["dtype"]]
        cos, sin = rope_arrays[f"{key}.cos"], rope_arrays[f"{key}.sin"]
        for name, a in (("cos", cos), ("sin", sin)):
            if (
                not isinstance(a, np.ndarray)
                or a.dtype != saved_np
                or a.ndim != 3
                or a.shape != cos.shape
                or a.shape[1] < seen
            ):
                raise _corrupt(
                    f"rotary table {key}.{name} is not {saved_np} (batch, >= {seen} tokens, dim) like its pair"
                )
        table = RopeTable()
        half = rope_meta[key].get("half", False)
        if not isinstance(half, bool):
            raise _corrupt(f"rotary table {key}: half must be true or false, got {half!r}")
        table.half = half
        dt = _TORCH[rope_meta[key]["dtype"]]
        device, dtype = placement[0]
        table.cos = _torch(cos, dt, device).to(dtype)
        table.sin = _torch(sin, dt, device).to(dtype)
        cache.rope_tables[int(key)] = table
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, NexusQuantLayer) or not layer.holding_tiers():
            continue  # holds no coded tokens
        if layer.settings.key_domain == "pre_rope":
            if layer.rope_key not in cache.rope_tables:
                raise _corrupt(f"layer {i} needs rotary table {layer.rope_key!r}, which the file does not hold")
    cache.token_ids = token_ids.to(placement[0][0]) if token_ids is not None else None
    return cache


def _formula_table(key: str, entry: dict[str, Any], arrays: dict[str, Any], seen: int, placement: tuple) -> RopeTable:
    """A rotary table saved as positions and the frequencies that give its angles."""
    formula = _dict(entry["formula"], f"rope table {key} formula")
    scaling = formula.get("scaling")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise _corrupt(f"rotary table {key}: scaling must be a finite number, got {scaling!r}")
    positions, inv_freq = arrays[f"{key}.positions"], arrays[f"{key}.inv_freq"]
    if (
        not isinstance(positions, np.ndarray)
        or positions.dtype != np.dtype("<i4")
        or positions.ndim != 2
        or positions.shape[1] < seen
    ):
        raise _corrupt(f"rotary table {key}.positions is not int32 (batch, >= {seen} tokens)")
    if (
        not isinstance(inv_freq, np.ndarray)
        or inv_freq.dtype != np.dtype("<f4")
        or inv_freq.ndim != 1
        or inv_freq.size == 0
        or not np.isfinite(inv_freq).all()
    ):
        raise _corrupt(f"rotary table {key}.inv_freq is not a non-empty finite float32 vector")
    device, dtype = placement
    table = RopeTable()
    # The angles come out in the loading model's dtype, as a table of rows is cast on load.
    table.formula = RopeFormula(_torch(inv_freq, None, device), float(scaling), dtype)
    table.positions = _torch(positions, None, device)
    return table


def inspect_file(path: Union[str, Path]) -> dict[str, Any]:
    """Header, settings, per-layer sizes and ratios of a cache file; reading it verifies every checksum."""
    path = Path(path)
    try:
        return _inspect_file(path)
    except NexusQuantError:
        raise
    except _CONTENT_ERRORS as e:
        raise _corrupt(f"{path}: {type(e).__name__}: {e}") from None


def _inspect_file(path: Path) -> dict[str, Any]:
    with _open_reader(path, _META_MAX_BYTES) as reader:
        version = reader.version
        n_sections = reader.section_count
        meta = _read_meta(reader)
    size = path.stat().st_size
    with _open_reader(path, _section_bound(meta)) as reader:
        if reader.skip() != "META":
            raise NexusQuantError(f"{path} changed while it was being read")
        layer_bytes = []
        for kind, payload in reader:
            if kind == "LAYR":
                if not isinstance(payload, dict):
                    raise _corrupt("a LAYR section is not an array directory")
                layer_bytes.append(sum(len(v) if isinstance(v, bytes) else v.nbytes for v in payload.values()))
    fp16 = meta.get("fp16_bytes") or 0
    resident = meta.get("resident_bytes")
    if not isinstance(fp16, (int, float)) or (resident is not None and not isinstance(resident, (int, float))):
        raise _corrupt("META byte counts are not numbers")
    return {
        "path": str(path),
        "format_version": version,
        "sections": n_sections,
        "file_bytes": size,
        "model": meta["fingerprint"],
        "settings": meta["settings"],
        "token_ids_shape": meta.get("token_ids_shape"),
        "layer_array_bytes": layer_bytes[: len(meta["layers"])],
        "resident_bytes": resident,
        "fp16_bytes": fp16,
        "file_ratio": fp16 / size if size else None,
        "resident_ratio": fp16 / resident if resident else None,
        "checksums": "verified",
    }
