"""Which vision tokens survive a cut: FlashAttention-compatible scoring and top-k operators.

Scoring uses only a few query rows (training: the last token before each answer; inference: the
last prompt token) against all keys of the *next* layer, so the fused attention of the layers
never has to return its probability matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hidrop_jax.layers.llama import DecoderLayer


def score_vision(dims, layer_params, x, rope, pos, valid, q_idx, q_valid, n_text: int):
    """(scores [B, n], k_raw [B, S, K·H]): one score per vision slot, the attention the query
    rows pay to it in the next layer, and that layer's unrotated keys, which the layer reuses for
    the tokens that survive (so scoring costs only the dropped tokens' keys and the query rows).

    x [B, S, D] enters the next layer (text stream first, vision block from `n_text`); its input
    RMSNorm and rotated q/k at the tokens' current positions give causal fp32 softmax rows for
    `q_idx` [B, Q] only, averaged over heads and over the valid query rows.
    """
    take = lambda a: jnp.take_along_axis(a, q_idx.reshape(q_idx.shape + (1,) * (a.ndim - 2)), axis=1)
    q, k, k_raw = DecoderLayer(dims).apply({"params": layer_params}, take(x), tuple(map(take, rope)),
                                           x, rope, method=DecoderLayer.attention_inputs)
    b, nq, nh, hd = q.shape
    q = q.reshape(b, nq, k.shape[2], nh // k.shape[2], hd)
    logits = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
    q_pos = jnp.take_along_axis(pos, q_idx, axis=1)
    allowed = (pos[:, None, :] <= q_pos[:, :, None]) & valid[:, None, :]
    logits = jnp.where(allowed[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))[:, :, n_text:]  # [B, Q, n]
    w = q_valid.astype(jnp.float32)
    return jnp.einsum("bqn,bq->bn", probs, w) / jnp.maximum(w.sum(-1, keepdims=True), 1.0), k_raw


def soft_rank(scores, alive, temperature: float):
    """Normalised rank in [0, 1] relaxed by a sigmoid of pairwise differences ("soft sorting").

    Scores are standardised per sample first: attention probabilities are ~1/S, far below any
    useful temperature. Dead slots (`alive` False) neither rank nor get ranked.
    """
    a = alive.astype(jnp.float32)
    n = jnp.maximum(a.sum(-1, keepdims=True), 1.0)
    mean = (scores * a).sum(-1, keepdims=True) / n
    std = jnp.sqrt((((scores - mean) * a) ** 2).sum(-1, keepdims=True) / n + 1e-20)  # finite grad at 0
    z = jnp.where(alive, (scores - mean) / std, 0.0)
    pair = jax.nn.sigmoid((z[:, :, None] - z[:, None, :]) / temperature)
    return (pair * a[:, None, :]).sum(-1) / n


def soft_mask(scores, alive, k: int, temperature: float):
    """The paper's mask σ(N·(r − (1 − k/N))) with N the tokens entering the cut."""
    n = alive.astype(jnp.float32).sum(-1, keepdims=True)
    r = soft_rank(scores, alive, temperature)
    return jax.nn.sigmoid(n * (r - (1.0 - k / jnp.maximum(n, 1.0))))


def top_k_sorted(scores, alive, k: int):
    """Indices [B, k] of the k best alive slots, in original (memory) order."""
    _, idx = jax.lax.top_k(jnp.where(alive, scores, -jnp.inf), k)
    return jnp.sort(idx, axis=-1)


def select(scores, alive, k: int, mode: str, temperature: float):
    """(indices [B, k], gate [B, k]).

    The gate multiplies the kept tokens' hidden states. Its value is exactly 1 (forward = hard
    top-k bit for bit); for `relaxed` and `mask` its gradient is the soft mask's, which is how
    the gradient reaches the scores (straight-through). For `hard` it is a constant.
    """
    idx = top_k_sorted(scores, alive, k)
    if mode == "hard":
        return idx, jnp.ones(idx.shape, jnp.float32)
    m = jnp.take_along_axis(soft_mask(scores, alive, k, temperature), idx, axis=1)
    return idx, 1.0 + (m - jax.lax.stop_gradient(m))
