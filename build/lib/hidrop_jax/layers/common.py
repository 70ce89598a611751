"""Shared building blocks: partitioned dense layers and scanned layer stacks."""

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
        cls = nn.remat(layer_cls, policy=remat_policy(remat), prevent_cse=False)
    kw = dict(variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
              length=length, unroll=max(length, 1) if unroll else 1,
              metadata_params={nn.PARTITION_NAME: "layers"})
    return nn.scan(cls, **kw) if method == "__call__" else nn.scan(cls, methods=[method], **kw)


def slice_layers(params, start: int, stop: int):
    """Layers [start, stop) of a stacked parameter tree."""
    return jax.tree.map(lambda p: p[start:stop], params)
