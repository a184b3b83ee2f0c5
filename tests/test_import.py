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
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


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


def test_importing_a_torch_module_first_registers_once_it_is_loaded():
    """nexusquant.attention imports transformers' modeling code itself: the hook must wait for it
    (this failed with an ImportError when a test module importing the harness was collected first)."""
    for module in ("nexusquant.eval.harness", "nexusquant.attention", "nexusquant.files"):
        run = _python(f"""
            import {module}
            from transformers import AttentionInterface
            assert "nexusquant" in AttentionInterface._global_mapping
            print("ok")
        """)
        assert run.returncode == 0 and run.stdout.strip() == "ok", (module, run.stderr[-3000:])


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


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (anywhere in its body)."""
    import ast
    from pathlib import Path

    root = Path(HERE).parent / "python" / "nexusquant"
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        modules[".".join(parts)] = (path, is_pkg)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from .x import y`: y is a module of the package or a name defined in x.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_package_imports_have_no_circle():
    """Imports run one way: leaves (_core, codec, tables, architecture) at the bottom, the cache in
    the middle, entry points on top. The package's __init__ only re-exports (and loads the rest
    lazily), so edges into it are left out: every submodule "imports" its package."""
    graph = {m: {d for d in deps if d != "nexusquant"} for m, deps in _package_imports().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circle = stack[stack.index(d) :] + [d]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "nexusquant.cache" in graph and "nexusquant.tables" in graph["nexusquant.tiers"]


def test_package_modules_import_the_package_at_the_top_only():
    """No import inside a function to dodge a circle: package imports sit at module level, except in
    the entry points, which load torch-dependent modules when a command or attribute needs them
    (`import nexusquant` and `nexusquant --help` stay without torch)."""
    import ast
    from pathlib import Path

    lazy_allowed = {"__init__.py", "cli.py"}
    root = Path(HERE).parent / "python" / "nexusquant"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name in lazy_allowed and path.parent == root:
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("nexusquant")):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
                if isinstance(node, ast.Import) and any(a.name.startswith("nexusquant") for a in node.names):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found
