"""Shared building blocks: partitioned dense layers and scanned layer stacks."""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name  # noqa: F401  (re-exported for the layers)

INIT_STD = 0.02  # HF's `initializer_range` default (LLaMA's and CLIP's)
INIT = nn.initializers.normal(INIT_STD)


def dense(features: int, axes: Sequence[str], *, use_bias: bool, dtype, name: str,
          init_std: float = INIT_STD) -> nn.Dense:
    """nn.Dense whose kernel [in, out] and bias [out] carry logical axis names; the kernel is
    drawn from N(0, init_std²) (HF's `initializer_range`)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
    )


def remat_policy(name: str):
    """Rematerialisation policy by name, over the intermediates the layers `checkpoint_name`."""
    return {
        "full": None,  # save nothing, recompute the layer
        "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    }[name]


def stacked(layer_cls, length: int, *, remat: str = "none", unroll: bool = False,
            method: str = "__call__", in_axes=nn.broadcast):
    """`length` copies of `layer_cls` as one `nn.scan` (compile time flat in depth).

    Every non-carry argument is broadcast unless `in_axes` says otherwise (e.g. a per-layer
    cache scanned over axis 0); params get a leading 'layers' axis. `method` picks the scanned
    method (call it with `apply(..., method=method)`). `unroll=True` lowers the layers one by
    one, which XLA's cost analysis needs to count every layer.
    """
    cls = layer_cls
    if remat != "none":
        # A scan keeps XLA from merging the backward's recompute with the forward (so remat
        # need not), but only while it stays a loop: XLA unrolls a one-trip loop (length 1,
        # or `unroll`), and the merged layer then holds every intermediate from the forward
        # to the backward (HiDrop's one-layer segments did: 2.3x vanilla's bytes per row).
        cls = nn.remat(layer_cls, policy=remat_policy(remat), prevent_cse=length == 1 or unroll)
    kw = dict(variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
              length=length, unroll=max(length, 1) if unroll else 1,
              metadata_params={nn.PARTITION_NAME: "layers"})
    return nn.scan(cls, **kw) if method == "__call__" else nn.scan(cls, methods=[method], **kw)


def slice_layers(params, start: int, stop: int):
    """Layers [start, stop) of a stacked parameter tree."""
    return jax.tree.map(lambda p: p[start:stop], params)


# Mesh axes that activations are split over inside layers; `sharding.RULES` maps the logical
# names "batch" and "heads" to these same tuples (one source).
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def mesh_axes(axes, dim: int, mesh=None):
    """The axes among `axes` that the current mesh has (size > 1), if together they divide
    `dim`; else None (replicated)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    names = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    return names if names and dim % math.prod(mesh.shape[a] for a in names) == 0 else None


def constrain_batch(x):
    """x [B, ...] split over the batch mesh axes, the rest replicated, when a mesh is set
    (`jax.set_mesh`, as `train.train` and `hidrop_jax.aot` compile); else x unchanged.

    Parameters are split over fsdp along their model dimension; without this XLA may follow
    them and split activations along the model dimension with the batch whole: 156 GB of
    temporaries per chip for LLaVA-1.5-7B stage 2 on 64 v5p chips (`hidrop_jax.aot`)."""
    mesh = jax.sharding.get_abstract_mesh()
    names = None if mesh.empty else mesh_axes(BATCH_AXES, x.shape[0], mesh)
    return x if names is None else jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(names))
