"""What ``import nexusquant`` does in a fresh interpreter: registers the attention for transformers
without importing torch itself, so the CLI's --help stays light."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(__file__)


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_nexusquant_then_set_attn_implementation_in_a_fresh_process():
    """README quickstart 3: nothing but `import nexusquant` before transformers loads a model."""
    run = _python("""
        import sys
        import nexusquant as nq
        assert "torch" not in sys.modules, "import nexusquant loaded torch"
        from tiny_models import make_tiny
        model = make_tiny("llama")
        model.set_attn_implementation("nexusquant")
        assert model.config._attn_implementation == "nexusquant"
        print("ok")
    """)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_import_nexusquant_after_transformers_registers_at_once():
    run = _python("""
        import transformers.modeling_utils
        from transformers import AttentionInterface
        import nexusquant
        assert "nexusquant" in AttentionInterface._global_mapping
        nexusquant.register_attention()  # idempotent
        print("ok")
    """)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_cli_help_does_not_import_torch():
    run = _python("""
        import sys
        from nexusquant.cli import main
        for argv in (["--help"], ["eval", "--help"], ["inspect", "--help"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
        print("ok", file=sys.stderr)
    """)
    assert run.returncode == 0 and run.stderr.strip().endswith("ok"), run.stderr[-3000:]
