"""The package's import graph: no cycles, nothing imports upward, no first-party import hidden
inside a function (the old way of dodging cycles), and the CLIs import without torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hidrop_jax"

# Low to high. A module may import its own group or lower ones, never a higher one. A new
# module must be placed here (the test names it).
ORDER = [
    # foundations: layers know nothing of HiDrop; the method knows nothing of models or data
    ("hidrop_jax.layers", "hidrop_jax.hidrop", "hidrop_jax.atomic", "hidrop_jax.cli",
     # copied into exports: torch and transformers only (the two modeling files import the third relatively)
     "hidrop_jax.hf.hidrop_torch", "hidrop_jax.hf.modeling_hidrop_llava",
     "hidrop_jax.hf.modeling_hidrop_qwen2_5_vl",
     "hidrop_jax.data.features", "hidrop_jax.data.local_builder", "hidrop_jax.data.image",
     "hidrop_jax.data.templates"),
    ("hidrop_jax.families", "hidrop_jax.config", "hidrop_jax.batch", "hidrop_jax.checks", "hidrop_jax.metrics", "hidrop_jax.data.shapes",
     "hidrop_jax.data.tokenizer"),
    ("hidrop_jax.perf", "hidrop_jax.hf.mapping", "hidrop_jax.hf.qwen_mapping", "hidrop_jax.hf.inputs",
     "hidrop_jax.hf.remote_code", "hidrop_jax.data.pipeline",
     "hidrop_jax.data.shapes_vqa", "hidrop_jax.data.llava_json", "hidrop_jax.data.sources"),
    ("hidrop_jax.model",),
    ("hidrop_jax.sharding", "hidrop_jax.hf.load", "hidrop_jax.hf.save", "hidrop_jax.hf.torch_eval",
     "hidrop_jax.analysis"),
    ("hidrop_jax.checkpoint",),
    ("hidrop_jax.data.setup",),
    ("hidrop_jax.evaluate", "hidrop_jax.generate"),
    ("hidrop_jax.train",),
    # command lines and tools
    ("hidrop_jax.aot", "hidrop_jax.convert", "hidrop_jax.analyze", "hidrop_jax.demo", "hidrop_jax.pretrain_tower",
     "hidrop_jax.xla_graph", "hidrop_jax.data.build"),
]
# Stricter than the order: what each foundation may import at all.
ONLY = {"hidrop_jax.layers": ("hidrop_jax.layers",),
        "hidrop_jax.hidrop": ("hidrop_jax.hidrop", "hidrop_jax.layers")}


def _modules():
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _match(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _group(name):
    if name == "hidrop_jax" or name in ("hidrop_jax.data", "hidrop_jax.hf"):  # docstring-only packages
        return -1
    hits = [i for i, g in enumerate(ORDER) if _match(name, g)]
    assert hits, f"module {name} has no place in tests/test_structure.py ORDER: add it"
    return hits[0]


def _edges():
    """{module: {(imported module, line, inside a function)}}, first-party only."""
    mods, edges = _modules(), {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(x) for f in funcs for x in ast.walk(f)}
        found = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            for t in targets:
                if t.startswith("hidrop_jax") and t != name:
                    found.add((t, node.lineno, id(node) in inner))
        edges[name] = found
    return edges


def test_every_import_flows_down():
    bad = []
    for name, found in _edges().items():
        for target, line, _ in found:
            if _group(target) > _group(name):
                bad.append(f"{name}:{line} imports {target} (a higher layer)")
            for pre, allowed in ONLY.items():
                if _match(name, (pre,)) and not _match(target, allowed):
                    bad.append(f"{name}:{line} imports {target} ({pre} may import only {allowed})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = {n: {t for t, _, _ in f} for n, f in _edges().items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_no_first_party_import_inside_functions():
    hidden = [f"{n}:{line} imports {t}" for n, f in _edges().items() for t, line, inner in f if inner]
    assert not hidden, "\n".join(sorted(hidden))


def test_training_cli_imports_without_torch():
    """torch is an extra (`hidrop_jax[torch]`): training, evaluation, generation, conversion
    and the AOT report must not need it. A stub that fails on import stands in for it."""
    code = ("import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
            "import hidrop_jax.train, hidrop_jax.evaluate, hidrop_jax.generate, hidrop_jax.convert\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "hidrop_jax.train", "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    # absl prints the usage and exits 1 for --help (its convention); no traceback
    assert r.returncode in (0, 1) and "--workdir" in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
