"""Llama decoder: RMSNorm, grouped-query attention with RoPE at explicit positions, SwiGLU."""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hidrop_jax.layers.attention import attention
from hidrop_jax.layers.common import INIT_STD, checkpoint_name, constrain_batch, dense
from hidrop_jax.layers.rope import apply_rope


@dataclasses.dataclass(frozen=True)
class TextDims:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None
    init_std: float = INIT_STD  # HF `initializer_range`: std of every weight at initialisation
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias (o_proj never does)


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(self.dtype)


class LlamaAttention(nn.Module):
    dims: TextDims

    def setup(self):
        d = self.dims
        lin = functools.partial(dense, use_bias=False, dtype=d.dtype, init_std=d.init_std)
        qkv = functools.partial(lin, use_bias=d.qkv_bias)
        self.q_proj = qkv(d.num_heads * d.head_dim, ("embed", "heads"), name="q_proj")
        self.k_proj = qkv(d.num_kv_heads * d.head_dim, ("embed", "kv_heads"), name="k_proj")
        self.v_proj = qkv(d.num_kv_heads * d.head_dim, ("embed", "kv_heads"), name="v_proj")
        self.o_proj = lin(d.hidden_size, ("heads", "embed"), name="o_proj")

    def _heads(self, x, n):
        return x.reshape(*x.shape[:-1], n, self.dims.head_dim)

    def query(self, x, rope):
        """Rotated queries [B, T, N, H]; `rope` = (cos, sin) at the tokens' positions."""
        return apply_rope(self._heads(self.q_proj(x), self.dims.num_heads), *rope)

    def key_value(self, x, rope, k_raw=None, v_raw=None):
        """Rotated keys and values [B, S, K, H]. `k_raw` / `v_raw` = k_proj(x) / v_proj(x) when
        already computed elsewhere."""
        k_raw = self.k_proj(x) if k_raw is None else k_raw
        v_raw = self.v_proj(x) if v_raw is None else v_raw
        return self.rotate_keys(k_raw, rope), self._heads(v_raw, self.dims.num_kv_heads)

    def rotate_keys(self, k_raw, rope):
        return apply_rope(self._heads(k_raw, self.dims.num_kv_heads), *rope)

    def __call__(self, x, rope, pos, valid, bias=None, k_raw=None, v_raw=None, return_kv=False):
        """Self-attention of x [B, S, D]; with `return_kv` also its rotated keys and values."""
        q = self.query(x, rope)
        k, v = self.key_value(x, rope, k_raw, v_raw)
        out = attention(q, k, v, pos, pos, valid, bias=bias, implementation=self.dims.attention_impl)
        out = self.o_proj(out.reshape(*x.shape[:-1], -1))
        return (out, (k, v)) if return_kv else out

    def decode(self, x, rope, pos, kv, k_pos, k_valid, index):
        """Cached attention of new tokens x [B, Q, D] at positions `pos` [B, Q].

        Their keys/values are written into the cache `kv` = (k, v) [B, S, K, H] at rows
        [index, index + Q); then they attend to every cached key that is valid and not after
        them. `k_pos`/`k_valid` [B, S] describe the cache *after* the write. -> (out, new kv).
        """
        q = self.query(x, rope)
        k_new, v_new = self.key_value(x, rope)
        k = lax.dynamic_update_slice_in_dim(kv[0], k_new.astype(kv[0].dtype), index, axis=1)
        v = lax.dynamic_update_slice_in_dim(kv[1], v_new.astype(kv[1].dtype), index, axis=1)
        out = attention(q, k, v, pos, k_pos, k_valid, implementation=self.dims.attention_impl)
        return self.o_proj(out.reshape(*x.shape[:-1], -1)), (k, v)


class LlamaMLP(nn.Module):
    dims: TextDims

    @nn.compact
    def __call__(self, x):
        d = self.dims
        lin = functools.partial(dense, use_bias=False, dtype=d.dtype, init_std=d.init_std)
        gate = lin(d.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
        up = lin(d.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
        return lin(d.hidden_size, ("mlp", "embed"), name="down_proj")(
            nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm Llama block. Scan-compatible: `(x, ...) -> (x, None)`, or `(x, (k, v))` with
    `return_kv` (the layer's rotated keys/values, which a scan stacks per layer: a KV cache).
    `decode` runs new tokens against such a cache."""
    dims: TextDims
    return_kv: bool = False

    def setup(self):
        d = self.dims
        self.input_layernorm = RMSNorm(d.rms_norm_eps, d.dtype)
        self.self_attn = LlamaAttention(d)
        self.post_attention_layernorm = RMSNorm(d.rms_norm_eps, d.dtype)
        self.mlp = LlamaMLP(d)

    def attention_inputs(self, xq, rope_q, xk, rope_k):
        """(rotated queries of rows `xq`, rotated keys of `xk`, unrotated k_proj of `xk`) after
        the input norm: what a score of this layer's attention needs, without running it. The
        unrotated keys can be handed back to `__call__` (`k_raw`) so they are not recomputed."""
        q = self.self_attn.query(self.input_layernorm(xq), rope_q)
        k_raw = self.self_attn.k_proj(self.input_layernorm(xk))
        return q, self.self_attn.rotate_keys(k_raw, rope_k), k_raw

    def project_kv(self, x):
        """Unrotated (k_proj, v_proj) of x after the input norm: per token, so they can be
        computed as soon as a token's input is known (the injected vision block, before the
        text reaches the injection layer) and handed to `__call__` as `k_raw` / `v_raw`."""
        h = self.input_layernorm(x)
        return self.self_attn.k_proj(h), self.self_attn.v_proj(h)

    def __call__(self, x, rope, pos, valid, bias=None, k_raw=None, v_raw=None):
        x = constrain_batch(x)
        h = self.self_attn(self.input_layernorm(x), rope, pos, valid, bias, k_raw, v_raw,
                           self.return_kv)
        h, kv = h if self.return_kv else (h, None)
        x = x + checkpoint_name(h, "attn_out")
        h = self.mlp(self.post_attention_layernorm(x))
        return constrain_batch(x + checkpoint_name(h, "mlp_out")), kv

    def decode(self, x, rope, pos, kv, k_pos, k_valid, index):
        """New tokens x [B, Q, D] against this layer's cache `kv` (see `LlamaAttention.decode`).
        Scan-compatible with `kv` scanned: -> (x, updated kv)."""
        h, kv = self.self_attn.decode(self.input_layernorm(x), rope, pos, kv, k_pos, k_valid, index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Embedder(nn.Module):
    """Token embedding; `attend` is the tied output head (x @ E^T)."""
    vocab_size: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    init_std: float = INIT_STD

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed")),
            (self.vocab_size, self.hidden_size), jnp.float32)

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        return jnp.einsum("...d,vd->...v", x, self.embedding.astype(self.dtype))
