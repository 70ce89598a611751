"""Qwen2.5-VL's vision tower and patch merger, as transformers 5.24's
`Qwen2_5_VisionTransformerPretrainedModel`, for one fixed patch grid per config.

- Input: the processor's flattened patches [B, S, C·T·P·P] (a still image is repeated over
  T = temporal_patch_size), ordered merge-block-major: [H/m, W/m, m, m] patches. The Conv3d
  patch embedding has stride = kernel, so it is one matmul on that vector.
- 2-D axial RoPE: half the rotated frequencies follow the patch row, half the column.
- Blocks: pre-RMSNorm, fused qkv (bias), non-causal attention, SwiGLU MLP with biases.
  Blocks in `fullatt_block_indexes` attend over the whole image; the others within windows of
  `window_size` px. As in HF, the sequence is permuted window-major first (`window_layout`) and the
  merger's output is permuted back; with a grid that the windows tile, window attention is a
  reshape, otherwise a segment mask over the (ragged) windows.
- Merger (the projector): RMSNorm, 2×2 neighbours concatenated, Linear-GELU-Linear.

The grid is static, so every index array here is NumPy, computed once at trace time.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hidrop_jax.layers.common import INIT_STD, dense, slice_layers, stacked
from hidrop_jax.layers.llama import RMSNorm

NORM_EPS = 1e-6  # HF hard-codes it for the blocks and the merger


@dataclasses.dataclass(frozen=True)
class QwenVisionDims:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: Tuple[int, ...]
    out_hidden_size: int
    grid_h: int  # patches per column of the fixed grid
    grid_w: int
    in_channels: int = 3
    rope_theta: float = 10000.0
    dtype: jnp.dtype = jnp.float32
    init_std: float = INIT_STD

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def num_tokens(self) -> int:
        """Merged tokens handed to the LLM."""
        return self.num_patches // self.merge_unit


# ----------------------------------------------------------------------------- static layout

def patch_positions(d: QwenVisionDims) -> np.ndarray:
    """(row, col) of every patch [S, 2] in the processor's merge-block-major order."""
    m = d.spatial_merge_size
    h, w = np.meshgrid(np.arange(d.grid_h), np.arange(d.grid_w), indexing="ij")
    shape = (d.grid_h // m, m, d.grid_w // m, m)
    return np.stack([a.reshape(shape).transpose(0, 2, 1, 3).reshape(-1) for a in (h, w)], -1)


def window_layout(d: QwenVisionDims):
    """(window_index [num_tokens], window sizes in merged tokens): HF's `get_vision_window_index`
    for one image. Merged tokens are regrouped window by window (raster inside a window); windows
    at the right/bottom edge may be partial."""
    n = d.window_size // d.spatial_merge_size // d.patch_size
    gh, gw = d.grid_h // d.spatial_merge_size, d.grid_w // d.spatial_merge_size
    index = np.arange(gh * gw).reshape(gh, gw)
    order, sizes = [], []
    for r in range(0, gh, n):
        for c in range(0, gw, n):
            win = index[r:r + n, c:c + n].reshape(-1)
            order.append(win)
            sizes.append(len(win))
    return np.concatenate(order), sizes


def vision_rope(d: QwenVisionDims):
    """cos/sin [S, head_dim] float32 in the processor's order: [f(row), f(col)] doubled."""
    dim = d.head_dim // 2
    inv_freq = 1.0 / (d.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    pos = jnp.asarray(patch_positions(d), jnp.float32)
    f = pos[:, :, None] * inv_freq  # [S, 2, dim // 2]
    f = jnp.concatenate([f[:, 0], f[:, 1]], -1)
    emb = jnp.concatenate([f, f], -1)
    return jnp.cos(emb), jnp.sin(emb)


def _permute(d: QwenVisionDims, x, index):
    """Reorders x [..., S, C] by merged-token `index` (HF `permute_input_for_window_attn`)."""
    s = x.shape[-2]
    x = x.reshape(*x.shape[:-2], s // d.merge_unit, d.merge_unit, x.shape[-1])
    return jnp.take(x, jnp.asarray(index), axis=-3).reshape(*x.shape[:-3], s, x.shape[-1])


# ----------------------------------------------------------------------------- modules

def _rotate(x, cos, sin):
    """RoPE in float32 (HF `apply_rotary_pos_emb_vision`), cast back. x [B, S, N, H]."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


class QwenVisionBlock(nn.Module):
    """One ViT block. `full`: attend over the whole image; otherwise within the windows given by
    `window_sizes` (in patches, over the window-permuted sequence). Scan-compatible."""
    dims: QwenVisionDims
    full: bool = False
    window_sizes: Tuple[int, ...] = ()

    def _attend(self, q, k, v):
        b, s, nh, hd = q.shape
        sizes = self.window_sizes
        if self.full or len(sizes) == 1:
            return jax.nn.dot_product_attention(q, k, v)
        if len(set(sizes)) == 1:  # uniform windows: a reshape, no mask
            w = sizes[0]
            q, k, v = (a.reshape(b * (s // w), w, nh, hd) for a in (q, k, v))
            return jax.nn.dot_product_attention(q, k, v).reshape(b, s, nh, hd)
        seg = jnp.asarray(np.repeat(np.arange(len(sizes)), sizes))
        mask = (seg[:, None] == seg[None, :])[None, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    @nn.compact
    def __call__(self, x, cos, sin):
        d = self.dims
        lin = lambda n, axes, name: dense(n, axes, use_bias=True, dtype=d.dtype, name=name,  # noqa: E731
                                          init_std=d.init_std)
        h = RMSNorm(NORM_EPS, d.dtype, name="norm1")(x)
        qkv = lin(3 * d.hidden_size, ("embed", "heads"), "qkv")(h)
        q, k, v = jnp.moveaxis(qkv.reshape(*h.shape[:-1], 3, d.num_heads, d.head_dim), -3, 0)
        a = self._attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v).reshape(h.shape)
        x = x + lin(d.hidden_size, ("heads", "embed"), "proj")(a)
        h = RMSNorm(NORM_EPS, d.dtype, name="norm2")(x)
        gate = lin(d.intermediate_size, ("embed", "mlp"), "gate_proj")(h)
        up = lin(d.intermediate_size, ("embed", "mlp"), "up_proj")(h)
        return x + lin(d.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up), None


class QwenPatchEmbed(nn.Module):
    """Conv3d(kernel = stride = (T, P, P), no bias) on flattened patches = a matmul."""
    dims: QwenVisionDims

    @nn.compact
    def __call__(self, patches):
        d = self.dims
        return dense(d.hidden_size, (None, "embed"), use_bias=False, dtype=d.dtype, name="proj",
                     init_std=d.init_std)(patches.astype(d.dtype))


class QwenPatchMerger(nn.Module):
    """RMSNorm, then each 2×2 block (consecutive in the sequence) as one vector, Linear-GELU-Linear."""
    dims: QwenVisionDims

    @nn.compact
    def __call__(self, x):
        d = self.dims
        h = RMSNorm(NORM_EPS, d.dtype, name="ln_q")(x)
        h = h.reshape(*h.shape[:-2], h.shape[-2] // d.merge_unit, d.merge_unit * h.shape[-1])
        wide = d.merge_unit * d.hidden_size
        h = dense(wide, ("embed", "mlp"), use_bias=True, dtype=d.dtype, name="mlp_0", init_std=d.init_std)(h)
        h = jax.nn.gelu(h, approximate=False)
        return dense(d.out_hidden_size, ("mlp", "embed"), use_bias=True, dtype=d.dtype, name="mlp_2",
                     init_std=d.init_std)(h)


def _segments(d: QwenVisionDims):
    """[(start, stop, full)]: runs of consecutive blocks of one kind, each run one scan."""
    full = [i in d.fullatt_block_indexes for i in range(d.depth)]
    out, a = [], 0
    for i in range(1, d.depth + 1):
        if i == d.depth or full[i] != full[a]:
            out.append((a, i, full[a]))
            a = i
    return out


def init_qwen_vision(d: QwenVisionDims, rng):
    """Boxed parameters: (tower {patch_embed, blocks}, merger)."""
    r = jax.random.split(rng, 3)
    x = jnp.zeros((1, d.num_patches, d.hidden_size), jnp.float32)
    cos = jnp.zeros((d.num_patches, d.head_dim), jnp.float32)
    tower = {
        "patch_embed": QwenPatchEmbed(d).init(r[0], jnp.zeros((1, 1, d.patch_dim)))["params"],
        "blocks": stacked(QwenVisionBlock, d.depth)(d, full=True).init(r[1], x, cos, cos)["params"],
    }
    return tower, QwenPatchMerger(d).init(r[2], x)["params"]


def qwen_vision_hidden(d: QwenVisionDims, tower, patches, *, remat: str = "none",
                       unroll: bool = False):
    """patches [B, S, patch_dim] -> the last block's output [B, S, C], window-permuted (HF's
    `last_hidden_state` for one image, per batch row)."""
    index, sizes = window_layout(d)
    x = QwenPatchEmbed(d).apply({"params": tower["patch_embed"]}, patches)
    x = _permute(d, x, index)
    cos, sin = (_permute(d, t, index) for t in vision_rope(d))
    win = tuple(s * d.merge_unit for s in sizes)
    for a, b, full in _segments(d):
        stack = stacked(QwenVisionBlock, b - a, remat=remat, unroll=unroll)(d, full=full, window_sizes=win)
        x, _ = stack.apply({"params": slice_layers(tower["blocks"], a, b)}, x, cos, sin)
    return x


def qwen_vision_features(d: QwenVisionDims, tower, merger, patches, *, remat: str = "none",
                         unroll: bool = False):
    """patches [B, S, patch_dim] -> merged tokens [B, S / 4, out_hidden_size] in raster order of
    the merged grid (HF's `pooler_output`): what the LLM receives at the image tokens."""
    x = qwen_vision_hidden(d, tower, patches, remat=remat, unroll=unroll)
    y = QwenPatchMerger(d).apply({"params": merger}, x)
    index, _ = window_layout(d)
    return jnp.take(y, jnp.asarray(np.argsort(index)), axis=-2)
