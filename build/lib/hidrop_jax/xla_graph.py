"""What depends on what in a compiled XLA program: evidence for parallel decoupling.

`branches(hlo_text, groups)` reads the optimized HLO text (`jitted.lower(...).compile().as_text()`),
tags every instruction of the entry computation with the input groups it transitively depends on
(groups are named by the entry parameters' `op_name`, e.g. "x.pixels" for `Inputs.pixels` when the
jitted function's argument is called `x`), and sums the matmul FLOPs of each dependency class,
descending into fusions, calls and while loops (times their known trip count).

Instructions that depend on one group and not on another can run in either order or at the same
time: that is all a scheduler needs. XLA decides what it does with the freedom (the CPU runtime
executes independent thunks concurrently; GPU and TPU programs run one stream of kernels, so
there the branch matters for latency hiding and multi-device placement, not for overlap).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_SHAPE = re.compile(r"^\(?\s*\w+\[([\d,]*)\]")
_CALLS = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.\-]+)")
_OP = re.compile(r"^(?:\([^)]*\)|\S+)\s+([\w\-]+)\(")


def _dims(s: str) -> list[int]:
    m = _SHAPE.match(s.strip())
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _parse(hlo_text: str):
    """{computation: [(name, rhs)]}, the entry's name, {computation: {param name: shape}}."""
    comps, params, entry, cur = {}, {}, None, None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            comps[cur] = []
            params[cur] = {p.split(":")[0].strip(): _dims(p.split(":", 1)[1])
                           for p in m.group(2).split(", ") if ":" in p}
            entry = cur if line.startswith("ENTRY") else entry
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            comps[cur].append((m.group(1), m.group(2)))
    return comps, entry, params


def _instr_flops(name, rhs, shapes, flops_of) -> float:
    """Matmul FLOPs of one instruction (`shapes` holds its operands'), plus what it calls."""
    op = _OP.match(rhs)
    op = op.group(1) if op else ""
    args = re.findall(r"%([\w.\-]+)", rhs.split("(", 1)[1]) if "(" in rhs else []
    total = 0.0
    if op == "dot":
        lhs = shapes.get(args[0], [])
        k = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rhs)
        contract = math.prod(lhs[int(i)] for i in k.group(1).split(",") if i) if k and lhs else 1
        total += 2.0 * math.prod(shapes[name]) * contract
    elif op == "convolution":
        kernel = shapes.get(args[1], [])  # [spatial..., in, out]: HWIO, as JAX lowers NHWC convs
        total += 2.0 * math.prod(shapes[name]) * math.prod(kernel[:-1]) if kernel else 0.0
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rhs)
    for called in _CALLS.findall(rhs):
        total += flops_of(called) * (int(trips.group(1)) if trips and op == "while" else 1)
    return total


def branches(hlo_text: str, groups: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Matmul FLOPs of the entry computation by dependency class.

    groups: {label: op_name prefixes of entry parameters}, e.g. {"text": ("x.text",),
    "image": ("x.pixels",)}. Returns {class: FLOPs}, a class being the '+'-joined sorted labels
    an instruction depends on ("" = parameters only).
    """
    comps, entry, params = _parse(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    memo = {}

    def flops_of(c):
        if c not in memo and c in comps:
            shapes, total = dict(params[c]), 0.0
            for name, rhs in comps[c]:
                shapes[name] = _dims(rhs)
                total += _instr_flops(name, rhs, shapes, flops_of)
            memo[c] = total
        return memo.get(c, 0.0)

    tags: dict[str, frozenset] = {}
    shapes = {}
    out = defaultdict(float)
    for name, rhs in comps[entry]:
        shapes[name] = _dims(rhs)
        if " parameter(" in rhs:
            op_name = re.search(r'op_name="([^"]*)"', rhs)
            op_name = op_name.group(1) if op_name else ""
            tag = {g for g, prefixes in groups.items() if op_name.startswith(prefixes)}
        else:
            tag = set()
            for a in re.findall(r"%([\w.\-]+)", rhs.split("(", 1)[1] if "(" in rhs else ""):
                tag |= tags.get(a, frozenset())
        tags[name] = frozenset(tag)
        out["+".join(sorted(tag))] += _instr_flops(name, rhs, shapes, flops_of)
    return dict(out)
