"""Exported HiDrop modeling files import with torch and transformers only: a static check of
their imports, and a run in a subprocess where `hidrop_jax` cannot be found."""

import ast
import shutil
import subprocess
import sys

ALLOWED = {"__future__", "torch", "transformers", ".hidrop_torch"}


def check_imports(files) -> None:
    """Every import of `files` is of torch, transformers or the shared `hidrop_torch` (relative)."""
    for src in files:
        roots = set()
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots.add("." * node.level + (node.module or "").split(".")[0])
        assert roots <= ALLOWED, (src.name, roots)


def run_isolated(tmp_path, files, module: str, body: str) -> None:
    """Copies `files` into a package `exported` of their own (as transformers loads them from an
    export), imports `exported.<module>` as `m` in `python -I` (no PYTHONPATH, no cwd on the path)
    without the editable-install finder, runs `body`, and checks no `hidrop_jax` module loaded."""
    pkg = tmp_path / "exported"
    pkg.mkdir()
    for src in files:
        shutil.copy(src, pkg / src.name)
    (pkg / "__init__.py").write_text("")
    code = f"""
import importlib, importlib.util, sys
# as if hidrop_jax were not installed: -I drops PYTHONPATH and the cwd; this drops the venv's
# editable-install finder (the one way left to find it)
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
assert importlib.util.find_spec("hidrop_jax") is None, "hidrop_jax is importable"
sys.path.insert(0, {str(tmp_path)!r})
m = importlib.import_module("exported.{module}")
import torch
{body}
bad = [n for n in sys.modules if n.split(".")[0] == "hidrop_jax"]
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
