"""The one attention entry point of the decoder.

Causality is defined by positions, not by memory order: a query attends to every valid key whose
persistent position is not after its own. HiDrop reorders and drops tokens, so memory order
never has to follow position order. `implementation` (`model.attention_impl`):

* None: the platform's default (`resolve`): "pallas" on TPU, where the compiled 7B train step
  holds a fraction of XLA's temporaries (BENCHMARKS.md); XLA on GPU and CPU (cuDNN's masked
  path has not yet run on a device here, so it stays an explicit choice).
* "xla" / "cudnn": `jax.nn.dot_product_attention` with the [B, 1, T, S] position mask ("cudnn"
  fails loudly where unsupported).
* "pallas": the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu`), which
  never builds the [T, S] logits. It knows only causality by index plus segment ids, so
  `flash_self_attention` sorts each row's tokens by position, runs the kernel causally with
  segment ids 1 (valid) / 0 (invalid or padding), and puts the rows back. It serves
  self-attention without a bias (training, prefill); the calls it cannot serve (a decode step's
  queries against their cache, an additive bias) take the XLA path, with the same result.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hidrop_jax.layers.common import BATCH_AXES, HEAD_AXES, mesh_axes

IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas")
PLATFORM_DEFAULT = {"tpu": "pallas"}  # every other platform: "xla"
BLOCK = 128  # the kernel's tile along the sequence; sequences are padded to a multiple of it


def position_mask(q_pos, k_pos, k_valid):
    """Boolean [B, 1, T, S]: key valid and at or before the query's position."""
    return ((k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :])[:, None]


def resolve(implementation: Optional[str], platform: Optional[str] = None) -> str:
    """The implementation that runs: `implementation`, or for None the default of `platform`
    (the devices the program is compiled for; default: JAX's default backend)."""
    if implementation is not None:
        return implementation
    return PLATFORM_DEFAULT.get(platform or jax.default_backend(), "xla")


def attention(q, k, v, q_pos, k_pos, k_valid, *, bias=None, implementation: Optional[str] = None):
    """q [B, T, N, H]; k, v [B, S, K, H] with K dividing N (grouped-query); scale 1/sqrt(H)."""
    if implementation == "pallas":
        if bias is None and q_pos is k_pos and q.shape[1] == k.shape[1]:
            return flash_self_attention(q, k, v, q_pos, k_valid)
        implementation = "xla"  # not self-attention without a bias: the kernel cannot serve it
    mask = position_mask(q_pos, k_pos, k_valid)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation)


def flash_self_attention(q, k, v, pos, valid, *, block: int = BLOCK):
    """Self-attention of q, k, v [B, S, ·, H] at positions `pos` [B, S] through the causal TPU
    flash kernel: equal to `attention(..., implementation="xla")` on every valid row, provided
    the valid tokens of a row have distinct positions (every layout the model builds). Invalid
    rows attend to invalid rows only (their outputs are never read as keys).

    Under a mesh (`jax.set_mesh`) the kernel runs inside `shard_map`, batch over the mesh axes
    the rules give "batch" and heads over those of "heads" (a Pallas call is not partitioned
    by XLA); without one it runs whole."""
    b, s, n, h = q.shape
    order = jnp.argsort(pos, axis=1, stable=True)                  # memory row of the i-th position
    inverse = jnp.argsort(order, axis=1)
    take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)  # noqa: E731
    q, k, v = take(q), take(k), take(v)
    if k.shape[2] != n:  # grouped-query: the kernel wants one K/V head per query head
        k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
    seg = jnp.take_along_axis(valid, order, axis=1).astype(jnp.int32)
    pad = (-s) % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))  # padding after everything, segment 0
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, N, S, H]
    out = _sharded_kernel(heads_first(q), heads_first(k), heads_first(v), seg, 1.0 / math.sqrt(h),
                          min(block, s + pad))
    out = out.transpose(0, 2, 1, 3)[:, :s]
    return jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)


def _kernel(q, k, v, seg, scale, block):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    bs = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                       block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                       block_q_dkv=block, block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    return fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(seg, seg), causal=True,
                              sm_scale=scale, block_sizes=bs)


def _sharded_kernel(q, k, v, seg, scale, block):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _kernel(q, k, v, seg, scale, block)
    bax, hax = mesh_axes(BATCH_AXES, q.shape[0], mesh), mesh_axes(HEAD_AXES, q.shape[1], mesh)
    spec4, spec2 = P(bax, hax, None, None), P(bax, None)
    return jax.shard_map(lambda q, k, v, seg: _kernel(q, k, v, seg, scale, block), mesh=mesh,
                         in_specs=(spec4, spec4, spec4, spec2), out_specs=spec4,
                         check_vma=False)(q, k, v, seg)
