"""The one attention entry point of the decoder.

Causality is defined by positions, not by memory order: a query attends to every valid key whose
persistent position is not after its own. HiDrop reorders and drops tokens, so memory order
never has to follow position order. The fused op (`jax.nn.dot_product_attention`) picks XLA on
CPU and cuDNN on GPU when `implementation` is None.
"""

from typing import Optional

import jax


def position_mask(q_pos, k_pos, k_valid):
    """Boolean [B, 1, T, S]: key valid and at or before the query's position."""
    return ((k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :])[:, None]


def attention(q, k, v, q_pos, k_pos, k_valid, *, bias=None, implementation: Optional[str] = None):
    """q [B, T, N, H]; k, v [B, S, K, H] with K dividing N (grouped-query); scale 1/sqrt(H)."""
    mask = position_mask(q_pos, k_pos, k_valid)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation)
