"""Shared fixtures: tiny random models of each family, the real SmolLM2, and a CUDA probe."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

torch = pytest.importorskip("torch")


def pytest_collection_modifyitems(config, items):
    has_gpu = False
    try:
        from nexusquant import gpu

        has_gpu = gpu.available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (bf16 weights expanded to fp32) and its tokenizer, loaded offline."""
    from nexusquant.eval.models import load_model

    return load_model("smollm2", dtype="float32")


@pytest.fixture(scope="session")
def corpus_text():
    from importlib.resources import files

    def read(name: str) -> str:
        return (files("nexusquant") / "eval" / "corpus" / name).read_text(encoding="utf-8", errors="replace")

    return read
