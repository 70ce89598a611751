"""Rotary position embedding in Hugging Face's rotate_half layout, at explicit positions.

Positions are per token (not `arange`), because HiDrop keeps every token's full-sequence
position after pruning; HF q/k weights then copy with a transpose only.
"""

import itertools

import jax.numpy as jnp


def rope_tables(positions, head_dim: int, theta: float):
    """cos/sin tables [B, S, head_dim] in float32 for integer `positions` [B, S]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_tables(positions, head_dim: int, theta: float, section):
    """Qwen2/2.5-VL's multimodal RoPE: cos/sin [B, S, head_dim] for positions [3, B, S] (rows t,
    h, w). Frequencies [0, s0) rotate by t, the next s1 by h, the last s2 by w (chunked layout,
    HF's `mrope_section`), then the half is doubled as in `rope_tables`. Text tokens have t = h =
    w, where this equals `rope_tables` exactly."""
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {tuple(section)} must sum to head_dim // 2 = {head_dim // 2}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, S, head_dim // 2]
    bounds = [0, *itertools.accumulate(section)]
    freqs = jnp.concatenate([freqs[r, ..., a:b] for r, (a, b) in enumerate(zip(bounds, bounds[1:]))], -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotates x [B, S, H, D] by tables [B, S, D]; computed in x's dtype, as HF does."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
