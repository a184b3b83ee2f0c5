"""docs/FORMAT.md lists every META key and LAYR array name that ``save_cache`` writes.

The tables of its section "What `save_cache` stores" are parsed; caches of every kind of content
(both E8 tiers, unquantized tiers, keys before RoPE with rotary tables, transform-coded keys, a
batch with padding) are saved, and every key path and array name found in the files must be listed.
A field renamed in the code without the doc (a changed file format) fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny
from transformers import DynamicCache

import nexusquant as nq
from nexusquant._core import read_nqkv
from nexusquant.compat import with_cache
from nexusquant.presets import CompressionSettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
SECTION = "## What `save_cache` stores: META keys and LAYR arrays"
# What a placeholder of the doc stands for in a real name.
PLACEHOLDERS = {"{tier}": "(?:fine|coarse|generated)", "{r}": "[0-9]+", "{key}": "-?[0-9]+", "*": "[a-z_]+"}


def _doc_tables() -> dict[str, list[tuple[str, str]]]:
    """(first column, second column) of every table row, by the heading above the table."""
    text = DOC.read_text()
    assert SECTION in text, f"docs/FORMAT.md has no section {SECTION!r}"
    rows: dict[str, list[tuple[str, str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
            continue
        m = re.match(r"\|\s*`([^`]+)`\s*\|\s*([^|]*)\|", line)
        if m:
            rows.setdefault(heading, []).append((m.group(1), m.group(2).strip()))
    return rows


def _pattern(name: str) -> re.Pattern:
    parts = re.split(r"(\{tier\}|\{r\}|\{key\}|\*)", name)
    return re.compile("".join(PLACEHOLDERS.get(p, re.escape(p)) for p in parts) + r"\Z")


def _doc_meta() -> tuple[set[str], set[str]]:
    """Documented META key paths, and those whose contents are free-form (not listed key by key)."""
    rows = _doc_tables()["META keys"]
    return {k for k, _ in rows}, {k for k, kind in rows if "free-form" in kind}


def _doc_arrays() -> list[re.Pattern]:
    tables = _doc_tables()
    names = [
        n for heading in ("LAYR arrays of a layer", "LAYR arrays of the rotary tables") for n, _ in tables[heading]
    ]
    names += [n for n, _ in tables["Transform-coded keys (inside `LAYR` arrays)"]]
    return [_pattern(n) for n in names]


def _paths(value, prefix: str, free: set[str]):
    """Key paths of a META value: ``a.b``, ``layers[].x``, rotary keys as ``{key}``."""
    if prefix and prefix != "layers[]":
        yield prefix
    if prefix in free or not isinstance(value, (dict, list)):
        return
    if isinstance(value, list):
        if prefix == "layers":
            for item in value:
                yield from _paths(item, "layers[]", free)
        return
    for k, v in value.items():
        name = "{key}" if prefix == "rope_tables" else k
        yield from _paths(v, f"{prefix}.{name}" if prefix else name, free)


def _saved(tmp_path, family, batch=1, **knobs):
    model = make_tiny(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (batch, 120), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1:, :10] = 0
    with nq.nexusquant_evict(model, **knobs), torch.no_grad():
        cache = DynamicCache()
        model(ids, attention_mask=mask, use_cache=True, **with_cache(model, cache))
    path = tmp_path / "c.nqkv"
    nq.save_cache(cache, path)
    return path


KINDS = {
    "e8-both-tiers": ("llama", 1, dict(quality="balanced", recent_window=8, demote=0.2)),
    "unquantized-tiers-padded": (
        "llama",
        2,
        dict(quality="balanced", recent_window=8, demote=0.2, key_bits=16, coarse_value_bits=16),
    ),
    "pre-rope": ("qwen2", 1, dict(quality="high", recent_window=8, key_domain="pre_rope")),
    "transform-coded": ("llama", 1, dict(quality="balanced", recent_window=8, key_codec="pca")),
    "refined-values": ("llama", 2, dict(quality="balanced", recent_window=8, value_refine_share=0.25)),
    "sliding": ("gemma3", 1, dict(quality="max", recent_window=8)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_written_name_is_documented(tmp_path, kind):
    family, batch, knobs = KINDS[kind]
    path = _saved(tmp_path, family, batch, **knobs)
    sections = read_nqkv(path)
    assert sections[0][0] == "META"
    meta = json.loads(bytes(sections[0][1]))
    keys, free = _doc_meta()
    written = set(_paths(meta, "", free))
    assert written - keys == set(), "META keys docs/FORMAT.md does not list"
    patterns = _doc_arrays()
    names = {n for kind_, payload in sections if kind_ == "LAYR" for n in payload}
    assert names, "no arrays written"
    missing = sorted(n for n in names if not any(p.match(n) for p in patterns))
    assert missing == [], "LAYR arrays docs/FORMAT.md does not list"


def test_every_setting_is_documented():
    keys, _ = _doc_meta()
    documented = {k.split(".", 1)[1] for k in keys if k.startswith("settings.")}
    assert documented == set(CompressionSettings().as_dict())


def test_file_settings_keys_are_the_settings_fields():
    # The file names its settings itself: a renamed or added field must be added there on purpose.
    from nexusquant.files import FILE_SETTINGS_KEYS

    assert len(set(FILE_SETTINGS_KEYS)) == len(FILE_SETTINGS_KEYS)
    assert set(FILE_SETTINGS_KEYS) == set(CompressionSettings().as_dict())
