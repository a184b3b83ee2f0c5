"""The type stub of the Rust extension matches the real module (mypy.stubtest)."""

import subprocess
import sys

import pytest


def test_core_stub_matches_the_extension():
    pytest.importorskip("mypy")
    run = subprocess.run([sys.executable, "-m", "mypy.stubtest", "nexusquant._core"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
