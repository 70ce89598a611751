"""Device meshes and the one logical-axis rules table.

Parameters carry logical axis names (`nn.with_logical_partitioning` in the layers); this table
maps them onto the mesh axes `data`, `fsdp`, `tensor`. Initialisation is abstract-first: shapes
from `jax.eval_shape`, shardings from the rules, then a jitted init with `out_shardings`, so the
full weights never land on one host.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hidrop_jax import model
from hidrop_jax.batch import to_inputs
from hidrop_jax.layers.common import BATCH_AXES, HEAD_AXES

AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes). Batch over data × fsdp; weights' model dim over fsdp
# (ZeRO-3 style: gathered per layer inside the scan); heads / MLP / vocab over tensor.
RULES = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", HEAD_AXES),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in one place takes the remaining devices. Auto axis
    types: Linen's logical constraints are assertions under the default Explicit axes."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape {tuple(shape)} must give (data, fsdp, tensor)")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = devices.size // max(rest, 1)
    if int(np.prod(shape)) != devices.size:
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices; "
                         f"{devices.size} are available")
    return Mesh(devices.reshape(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (e.g. a 3-channel conv input)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
    return P(*out)


def param_shardings(cfg, mesh: Mesh, rules=RULES):
    """NamedSharding per parameter from its logical axes and the rules table."""
    logical = model.param_axes(cfg)
    shapes = model.abstract_params(cfg)
    with nn.logical_axis_rules(rules):
        mesh_specs = nn.logical_to_mesh(logical)
    return jax.tree.map(lambda spec, a: NamedSharding(mesh, _fit(spec, a.shape, mesh)),
                        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def check_not_replicated(shardings, shapes, mesh: Mesh, min_elements: int = 1 << 20) -> None:
    """With fsdp > 1 every large parameter must be split: a bad rules table would otherwise
    silently replicate it on every device (and run out of memory at 7B). The default bar (1M
    elements) lets the stacked norm scales and biases stay replicated (layers × width: 131K at
    7B, which 1 << 16 refused, so no 7B run could start); a 7B weight matrix has ≥ 16M."""
    if mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1:
        return
    bad = []
    for (path, sh), a in zip(jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree.leaves(shapes)):
        if int(np.prod(a.shape)) >= min_elements and all(s is None for s in sh.spec):
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(a.shape)}")
    if bad:
        raise ValueError(f"{len(bad)} large parameters stay replicated on mesh {dict(mesh.shape)}: "
                         + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")
                         + "; fix the logical-axis rules (hidrop_jax.sharding.RULES)")


def sharded_init(cfg, mesh: Mesh, rng, rules=RULES):
    """Parameters initialised directly into their shardings (never whole on one device)."""
    shardings = param_shardings(cfg, mesh, rules)
    check_not_replicated(shardings, model.abstract_params(cfg), mesh)
    return model.init_params(cfg, rng, out_shardings=shardings), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data × fsdp; everything else replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


# ----------------------------------------------------------------------------- batches

def local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in its local batch order."""
    seen, rows = set(), []
    for sh in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
        key = (sh.index[0].start, sh.index[0].stop)
        if key not in seen:  # replicas over the other mesh axes hold the same rows
            seen.add(key)
            rows.append(np.asarray(sh.data))
    return np.concatenate(rows)


def process_sum(x) -> np.ndarray:
    """`x` (a numpy array, the same shape on every process) summed over all processes."""
    x = np.asarray(x)
    if jax.process_count() > 1:
        x = np.asarray(multihost_utils.process_allgather(x)).sum(0)
    return x


def put_batch(batch: dict, mesh):
    """This process's rows -> global batch-sharded arrays: (Inputs, Targets)."""
    inputs, targets = to_inputs(batch)
    sh = batch_sharding(mesh)
    put = lambda x: None if x is None else jax.make_array_from_process_local_data(sh, np.asarray(x))
    return jax.tree.map(put, inputs), jax.tree.map(put, targets)
