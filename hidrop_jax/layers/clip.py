"""CLIP ViT vision tower as used by LLaVA: patch conv (no bias), class + position embeddings,
pre-layernorm, pre-LN blocks. LLaVA reads an intermediate hidden state (−2 by default) and never
uses `post_layernorm`; we keep its weights only so exports round-trip bit-exactly.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from hidrop_jax.layers.common import INIT, constrain_batch, dense, slice_layers, stacked


@dataclasses.dataclass(frozen=True)
class VisionDims:
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _layer_norm(d: VisionDims, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=d.layer_norm_eps, dtype=d.dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class ClipEmbeddings(nn.Module):
    """pixels NHWC -> pre-layernormed [CLS, patches] + position embeddings."""
    dims: VisionDims

    @nn.compact
    def __call__(self, pixels):
        d = self.dims
        patches = nn.Conv(
            d.hidden_size, (d.patch_size, d.patch_size), strides=(d.patch_size, d.patch_size),
            padding="VALID", use_bias=False, dtype=d.dtype, param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(INIT, (None, None, None, "embed")),
            name="patch_embedding")(pixels.astype(d.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d.hidden_size)
        cls = self.param("class_embedding", nn.with_logical_partitioning(INIT, ("embed",)),
                         (d.hidden_size,), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(d.dtype), (b, 1, d.hidden_size)), patches], 1)
        pos = self.param("position_embedding", nn.with_logical_partitioning(INIT, (None, "embed")),
                         (d.num_patches + 1, d.hidden_size), jnp.float32)
        x = x + pos.astype(d.dtype)[None]
        return _layer_norm(d, "pre_layrnorm")(x)


def _act(name: str, x):
    return x * jax.nn.sigmoid(1.702 * x) if name == "quick_gelu" else jax.nn.gelu(x, approximate=False)


class ClipEncoderLayer(nn.Module):
    """Pre-LN ViT block with bidirectional attention. Scan-compatible."""
    dims: VisionDims

    @nn.compact
    def __call__(self, x):
        d = self.dims
        hd = d.hidden_size // d.num_heads
        x = constrain_batch(x)
        h = _layer_norm(d, "layer_norm1")(x)
        q, k, v = (dense(d.hidden_size, ("embed", "heads"), use_bias=True, dtype=d.dtype, name=n)(h)
                   .reshape(*h.shape[:-1], d.num_heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
        a = jax.nn.dot_product_attention(q, k, v).reshape(h.shape)
        x = x + dense(d.hidden_size, ("heads", "embed"), use_bias=True, dtype=d.dtype, name="out_proj")(a)
        h = _layer_norm(d, "layer_norm2")(x)
        h = dense(d.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=d.dtype, name="fc1")(h)
        h = dense(d.hidden_size, ("mlp", "embed"), use_bias=True, dtype=d.dtype, name="fc2")(_act(d.hidden_act, h))
        return constrain_batch(x + h), None


class ClipPostLayerNorm(nn.Module):
    """Unused by LLaVA; declared so the checkpoint's weights have a home."""
    dims: VisionDims

    @nn.compact
    def __call__(self, x):
        return _layer_norm(self.dims, "post_layernorm")(x)


def init_vision(d: VisionDims, rng, *, remat: str = "none"):
    """Boxed (logically partitioned) parameters of the whole tower."""
    r1, r2 = jax.random.split(rng)
    pixels = jnp.zeros((1, d.image_size, d.image_size, d.num_channels), jnp.float32)
    x = jnp.zeros((1, d.num_patches + 1, d.hidden_size), jnp.float32)
    return {
        "embeddings": ClipEmbeddings(d).init(r1, pixels)["params"],
        "layers": stacked(ClipEncoderLayer, d.num_layers, remat=remat)(d).init(r2, x)["params"],
        "post_layernorm": ClipPostLayerNorm(d).init(r1, x)["params"]["post_layernorm"],
    }


def vision_hidden_state(d: VisionDims, params, pixels, n_layers: int, *, remat: str = "none",
                        unroll: bool = False):
    """HF's `hidden_states[n_layers]`: the output after the first `n_layers` blocks
    (0 = the pre-layernormed embeddings). Later blocks are not computed."""
    x = ClipEmbeddings(d).apply({"params": params["embeddings"]}, pixels)
    if n_layers:
        stack = stacked(ClipEncoderLayer, n_layers, remat=remat, unroll=unroll)(d)
        x, _ = stack.apply({"params": slice_layers(params["layers"], 0, n_layers)}, x)
    return x
