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
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from . import __version__
from ._core import NexusQuantError, NqkvReader, pack_codes, unpack_codes, write_nqkv
from .cache import NexusQuantCache, NexusQuantLayer, compression_stats, layer_plan
from .presets import CompressionSettings
from .rope import RopeTable

__all__ = ["save_cache", "load_cache", "inspect_file", "model_fingerprint"]

FORMAT_NAME = "nexusquant-kv-cache"
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LAYER_TENSORS = ("sink_k", "sink_v", "sink_seq", "sink_valid", "win_k", "win_v", "win_valid", "k_center", "v_center")


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What a saved cache must match: architecture, layer and head shapes, rotary parameters."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    rope = {}
    for name in ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "rotary_pct", "rotary_dim",
                 "rotary_emb_base", "max_position_embeddings"):
        value = getattr(text, name, None)
        if value is not None:
            rope[name] = value
    return {
        "model_type": getattr(text, "model_type", None),
        "architectures": getattr(config, "architectures", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None),
        "hidden_size": hidden,
        "vocab_size": getattr(text, "vocab_size", None),
        "sliding_windows": layer_plan(config),
        "rope": json.loads(json.dumps(rope, default=str)),
    }


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


def _pack_tier_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[bytes, np.ndarray]:
    """Every (batch, head) stream of a tier packed losslessly; returns the bytes and stream offsets."""
    c = _np(codes)
    s = _np(scales).view(np.uint16)
    b, h = s.shape[0], s.shape[1]
    blobs = [pack_codes(np.ascontiguousarray(c[i, j]), np.ascontiguousarray(s[i, j]), bits) for i in range(b) for j in range(h)]
    offsets = np.zeros(len(blobs) + 1, dtype=np.uint64)
    offsets[1:] = np.cumsum([len(x) for x in blobs])
    return b"".join(blobs), offsets


def _unpack_tier_codes(blob: bytes, offsets: np.ndarray, shape: tuple[int, int, int], device):
    b, h, t = shape
    codes, scales = [], []
    if len(offsets) != b * h + 1 or int(offsets[-1]) != len(blob):
        raise NexusQuantError("corrupt cache file: code stream offsets do not match the stored streams")
    for k in range(b * h):
        c, s = unpack_codes(blob[int(offsets[k]) : int(offsets[k + 1])])
        if s.shape[0] != t:
            raise NexusQuantError(f"corrupt cache file: a code stream holds {s.shape[0]} tokens, expected {t}")
        codes.append(c)
        scales.append(s)
    c = np.stack(codes).reshape(b, h, t, -1)
    s = np.stack(scales).reshape(b, h, t).view(np.int16)
    return torch.from_numpy(c).to(device), torch.from_numpy(s).to(device)


def _layer_arrays(layer: NexusQuantLayer) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays: dict[str, Any] = {}
    meta: dict[str, Any] = {"seen": layer.seen, "first_compression_done": layer.first_compression_done,
                            "dropped": layer.dropped, "prompt_tokens": layer.prompt_tokens,
                            "sliding_window": layer.sliding_window, "record_positions": layer.record_positions,
                            "rope_key": layer.rope_key}
    if not layer.is_initialized:
        meta["initialized"] = False
        return arrays, meta
    meta.update(initialized=True, dtype=str(layer.dtype).replace("torch.", ""), batch=layer.batch,
                heads=layer.heads, head_dim=layer.head_dim)
    for name in _LAYER_TENSORS:
        t = getattr(layer, name)
        if t is not None:
            arrays[name] = _np(t)
    for tier_name in ("fine", "coarse"):
        tier = getattr(layer, tier_name)
        meta[tier_name] = {"length": tier.length}
        if tier.length == 0:
            continue
        for part, qt in (("k", tier.keys), ("v", tier.values)):
            if qt.codec is None:
                arrays[f"{tier_name}.{part}.raw"] = _np(qt.raw)
            else:
                blob, offsets = _pack_tier_codes(qt.codes, qt.scales, qt.bits)
                arrays[f"{tier_name}.{part}.packed"] = blob
                arrays[f"{tier_name}.{part}.offsets"] = offsets
        if tier.seq is not None:
            arrays[f"{tier_name}.seq"] = _np(tier.seq)
        if tier.valid is not None:
            arrays[f"{tier_name}.valid"] = _np(tier.valid)
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
        raise NexusQuantError("this cache does not know its model; create it with NexusQuantCache(model.config) or nexusquant_evict")
    ids = token_ids if token_ids is not None else getattr(cache, "token_ids", None)
    seen = layers[0].seen
    if ids is not None and ids.shape[-1] != seen:
        raise NexusQuantError(f"token_ids hold {ids.shape[-1]} tokens but the cache holds {seen}")
    settings: CompressionSettings = layers[0].settings
    layer_metas, layer_sections = [], []
    for layer in layers:
        arrays, meta = _layer_arrays(layer)
        layer_metas.append(meta)
        layer_sections.append(("LAYR", arrays))
    rope_tables = getattr(cache, "rope_tables", {}) or {}
    rope_meta = {}
    rope_arrays: dict[str, Any] = {}
    for key, table in rope_tables.items():
        if table.cos is not None:
            rope_meta[str(key)] = {"dtype": str(table.cos.dtype).replace("torch.", "")}
            rope_arrays[f"{key}.cos"] = _np(table.cos)
            rope_arrays[f"{key}.sin"] = _np(table.sin)
    stats = compression_stats(cache)
    meta = {
        "format": FORMAT_NAME,
        "nexusquant_version": __version__,
        "fingerprint": fingerprint,
        "settings": settings.as_dict(),
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
    size = write_nqkv(str(path), sections)
    return {
        "file_bytes": size,
        "resident_bytes": stats["nbytes"],
        "fp16_bytes": stats["fp16_nbytes"],
        "file_ratio": stats["fp16_nbytes"] / size,
        "resident_ratio": stats["ratio"],
    }


def _read_meta(reader) -> dict[str, Any]:
    first = next(iter(reader), None)
    if first is None or first[0] != "META":
        raise NexusQuantError("not a nexusquant cache file: it does not start with a META section")
    try:
        meta = json.loads(bytes(first[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NexusQuantError(f"corrupt cache file: META is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise NexusQuantError("not a nexusquant cache file (META names another format)")
    return meta


def _check_fingerprint(saved: dict[str, Any], model: Any) -> None:
    current = json.loads(json.dumps(model_fingerprint(model.config), default=str))
    diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        details = "; ".join(f"{k}: file {saved.get(k)!r} vs model {current.get(k)!r}" for k in diff[:4])
        raise NexusQuantError(f"the cache file was made for a different model ({details})")


def _layer_devices(model: Any, n: int) -> list[torch.device]:
    from .evict import attention_modules

    mods = sorted(attention_modules(model), key=lambda m: m.layer_idx)
    devices = []
    for i in range(n):
        m = next((m for m in mods if m.layer_idx == i), None)
        p = next(m.parameters()) if m is not None else next(model.parameters())
        devices.append(p.device)
    return devices


def _restore_layer(layer: NexusQuantLayer, meta: dict[str, Any], arrays: dict[str, Any], device) -> None:
    for key in ("seen", "first_compression_done", "dropped", "prompt_tokens"):
        setattr(layer, key, meta[key])
    layer.rope_key = meta.get("rope_key")
    if not meta.get("initialized"):
        return
    dtype = _TORCH.get(meta["dtype"])
    if dtype is None:
        raise NexusQuantError(f"corrupt cache file: unknown dtype {meta['dtype']!r}")
    b, h, d = meta["batch"], meta["heads"], meta["head_dim"]
    probe = torch.empty(b, h, 0, d, dtype=dtype, device=device)
    layer.lazy_initialization(probe, probe)
    for name in _LAYER_TENSORS:
        if name in arrays:
            is_value = name.endswith(("_k", "_v", "center"))
            setattr(layer, name, _torch(arrays[name], dtype if is_value else None, device))
    for tier_name in ("fine", "coarse"):
        tier = getattr(layer, tier_name)
        n = meta[tier_name]["length"]
        if n == 0:
            continue
        for part, qt in (("k", tier.keys), ("v", tier.values)):
            if qt.codec is None:
                qt.raw = _torch(arrays[f"{tier_name}.{part}.raw"], dtype, device)
            else:
                qt.codes, qt.scales = _unpack_tier_codes(
                    arrays[f"{tier_name}.{part}.packed"], arrays[f"{tier_name}.{part}.offsets"], (b, h, n), device
                )
        tier.seq = _torch(arrays[f"{tier_name}.seq"], None, device) if f"{tier_name}.seq" in arrays else None
        tier.valid = _torch(arrays[f"{tier_name}.valid"], None, device) if f"{tier_name}.valid" in arrays else None
        tier._length = n


def load_cache(path: Union[str, Path], model: Any) -> NexusQuantCache:
    """Read a cache saved by :func:`save_cache`, for ``model`` (its fingerprint must match).

    Each layer's tensors go to the device of that layer's attention weights, so a model split
    over several GPUs gets each layer's codes on its own GPU. The returned cache carries the prefix
    token ids as ``cache.token_ids``; ``generate`` continues after them. Raises NexusQuantError for
    a file of another model, a truncated, corrupted, foreign or newer-version file.
    """
    path = Path(path)
    if not path.is_file():
        raise NexusQuantError(f"{path} is not a file")
    with NqkvReader(str(path)) as reader:
        meta = _read_meta(reader)
        _check_fingerprint(meta["fingerprint"], model)
        try:
            settings = CompressionSettings(**meta["settings"])
        except TypeError as e:
            raise NexusQuantError(f"cache file settings are not understood by this version: {e}") from None
        cache = NexusQuantCache(model.config, preset=settings)
        n_layers = len(cache.layers)
        if len(meta["layers"]) != n_layers:
            raise NexusQuantError(f"cache file holds {len(meta['layers'])} layers, the model has {n_layers}")
        devices = _layer_devices(model, n_layers)
        token_ids = None
        layer_i = 0
        rope_arrays = None
        for kind, payload in reader:
            if kind == "TOKN":
                shape = meta.get("token_ids_shape")
                ids = np.frombuffer(bytes(payload), dtype="<u4")
                if shape is None or int(np.prod(shape)) != ids.size:
                    raise NexusQuantError("corrupt cache file: token ids do not match their recorded shape")
                token_ids = torch.from_numpy(ids.astype(np.int64).reshape(shape))
            elif kind == "LAYR":
                if layer_i < n_layers:
                    layer = cache.layers[layer_i]
                    _restore_layer(layer, meta["layers"][layer_i], payload, devices[layer_i])
                    layer_i += 1
                else:
                    rope_arrays = payload
        if layer_i != n_layers:
            raise NexusQuantError(f"truncated cache file: {layer_i} of {n_layers} layers present")
    for key in meta.get("rope_tables", {}):
        if rope_arrays is None:
            raise NexusQuantError("corrupt cache file: rotary angles are missing")
        table = RopeTable()
        dt = _TORCH[meta["rope_tables"][key]["dtype"]]
        table.cos = _torch(rope_arrays[f"{key}.cos"], dt, devices[0])
        table.sin = _torch(rope_arrays[f"{key}.sin"], dt, devices[0])
        cache.rope_tables[int(key)] = table
    cache.token_ids = token_ids.to(devices[0]) if token_ids is not None else None
    return cache


def inspect_file(path: Union[str, Path]) -> dict[str, Any]:
    """Header, settings, per-layer sizes and ratios of a cache file; reading it verifies every checksum."""
    path = Path(path)
    size = path.stat().st_size
    with NqkvReader(str(path)) as reader:
        version = reader.version
        n_sections = reader.section_count
        meta = _read_meta(reader)
        layer_bytes = []
        for kind, payload in reader:
            if kind == "LAYR":
                layer_bytes.append(sum(len(v) if isinstance(v, bytes) else v.nbytes for v in payload.values()))
    fp16 = meta.get("fp16_bytes") or 0
    return {
        "path": str(path),
        "format_version": version,
        "sections": n_sections,
        "file_bytes": size,
        "model": meta["fingerprint"],
        "settings": meta["settings"],
        "token_ids_shape": meta.get("token_ids_shape"),
        "layer_array_bytes": layer_bytes[: len(meta["layers"])],
        "resident_bytes": meta.get("resident_bytes"),
        "fp16_bytes": fp16,
        "file_ratio": fp16 / size if size else None,
        "resident_ratio": fp16 / meta["resident_bytes"] if meta.get("resident_bytes") else None,
        "checksums": "verified",
    }
