"""The ``nexusquant`` command at its edges: bad arguments are usage errors, I/O failures are one
line on stderr, and a closed pipe is not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nexusquant.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--threads", "0"],
        ["eval", "--threads", "-2"],
        ["eval", "--methods", ""],
        ["eval", "--presets", ","],
        ["eval", "--prefix", "0"],
        ["eval", "--continuation", "0"],
        ["eval", "--retrieval-trials", "-1"],
    ],
)
def test_bad_eval_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_unwritable_output_directory_fails_before_the_model_loads(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in ("/proc/nexusquant-test/x", str(blocker / "sub")):
        assert main(["eval", "--out", out, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "cannot create the output directory" in err and "Traceback" not in err


def test_inspect_of_a_fifo_returns_at_once(tmp_path, capsys):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    assert main(["inspect", str(fifo)]) == 2  # would block forever if the FIFO were opened
    assert "not a regular file" in capsys.readouterr().err


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    import torch
    from tiny_models import make_tiny

    import nexusquant as nq
    from nexusquant.compat import with_cache

    model = make_tiny("llama")
    ids = torch.randint(3, 90, (1, 80), generator=torch.Generator().manual_seed(0))
    with nq.nexusquant_evict(model, recent_window=8), torch.no_grad():
        cache = nq.NexusQuantCache(model)
        model(ids, **with_cache(model, cache), use_cache=True)
    path = tmp_path / "c.nqkv"
    nq.save_cache(cache, path)
    # `nexusquant inspect FILE | head -1`: the reader closes the pipe after one line.
    with subprocess.Popen(
        [sys.executable, "-m", "nexusquant.cli", "inspect", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as inspect:
        assert inspect.stdout is not None and inspect.stderr is not None
        inspect.stdout.close()  # nobody reads: the first write fails with EPIPE
        err = inspect.stderr.read().decode()
        assert inspect.wait(timeout=300) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err
