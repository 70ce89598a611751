"""Qwen2.5-VL as a model family: config, vision tower + merger, M-RoPE positions, preprocessing,
its HF batch adapter (`hf_to_inputs`) and data-pipeline image (`example_vision`).

The LLM is Qwen2 = our Llama decoder with q/k/v biases, rotated by M-RoPE: three position rows
(t, h, w). Text has t = h = w (= its 1-D position); an image's merged tokens sit at
(start, start + row, start + col) and the text after it resumes at start + max(rows, cols),
as transformers 5.24's `get_rope_index` builds them (ported below for still images). The order
that drives masks and scoring stays the plain sequence index, as for LLaVA.

Static shapes: one patch grid per config (`model.vision.image_size` = [height, width] px,
multiples of patch·merge); 672×672 gives 24×24 = 576 merged tokens, LLaVA-1.5's count.

Aspect-ratio buckets (`model.vision.buckets`, [[h, w], ...] px; empty = the one grid above): an
image goes to the bucket nearest its aspect ratio and the ViT runs at that bucket's grid (one
compile per bucket); its n_b merged tokens fill the first n_b of the N = n_vision_tokens(image_size)
vision slots and the other N − n_b are dead (`Inputs.vision_valid`), so the LLM's shape and every
HiDrop schedule stay those of `image_size`. Bucketed pixels carry their grid in their shape:
[B, gh/m, gw/m, m²·C·T·P·P] (the flattened patches, merge-block-major, reshaped).
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import ml_collections
import numpy as np

from PIL import Image

from hidrop_jax.data.image import CLIP_MEAN, CLIP_STD, decode
from hidrop_jax.data.templates import QWEN_TEMPLATE_STRINGS
from hidrop_jax.families.base import Family, fail, hf_text_stream
from hidrop_jax.layers.common import INIT_STD
from hidrop_jax.layers.qwen_vision import (QwenVisionDims, init_qwen_vision, qwen_vision_features,
                                           window_layout)

NAME = "qwen2_5_vl"
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "minimal", "full")
ATTENTION_IMPLS = (None, "xla", "cudnn")


def model_config(*, vision: dict, text: dict, image_token_id: int = 151655,
                 video_token_id: int = 151656, vision_start_token_id: int = 151652,
                 vision_end_token_id: int = 151653, dtype: str = "float32", remat: str = "none",
                 scan_unroll: bool = False, attention_impl: str | None = None,
                 ) -> ml_collections.ConfigDict:
    """`cfg.model` for Qwen2.5-VL; defaults follow the released 3B/7B vision tower."""
    v = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
             temporal_patch_size=2, spatial_merge_size=2, window_size=112,
             fullatt_block_indexes=(7, 15, 23, 31), in_channels=3, hidden_act="silu",
             tokens_per_second=2, rope_theta=10000.0, image_size=(672, 672),
             initializer_range=INIT_STD, buckets=())
    v.update(vision)
    v["fullatt_block_indexes"] = tuple(v["fullatt_block_indexes"])
    v["image_size"] = tuple(v["image_size"])
    v["buckets"] = tuple(tuple(b) if isinstance(b, (list, tuple)) else b for b in v["buckets"])
    t = dict(rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu", tie_word_embeddings=False,
             max_position_embeddings=128000, initializer_range=INIT_STD, qkv_bias=True,
             mrope_section=(16, 24, 24))
    t.update(text)
    t["mrope_section"] = tuple(t["mrope_section"])
    t.setdefault("num_kv_heads", t["num_heads"])
    t.setdefault("head_dim", t["hidden_size"] // t["num_heads"])
    v.setdefault("out_hidden_size", t["hidden_size"])
    m = ml_collections.ConfigDict(dict(
        family=NAME, vision=v, text=t, image_token_id=image_token_id, video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
        dtype=dtype, remat=remat, scan_unroll=scan_unroll,
        attention_impl=ml_collections.FieldReference(attention_impl, field_type=str)))
    validate(m)
    return m


def validate(m) -> None:
    """Fails naming the field, the value and what is allowed."""
    v, t = m.vision, m.text
    if m.dtype not in DTYPES:
        fail("model.dtype", m.dtype, f"one of {DTYPES}")
    if m.remat not in REMAT_POLICIES:
        fail("model.remat", m.remat, f"one of {REMAT_POLICIES}")
    if m.get("attention_impl") not in ATTENTION_IMPLS:
        fail("model.attention_impl", m.attention_impl, f"one of {ATTENTION_IMPLS}")
    if v.hidden_act != "silu":
        fail("model.vision.hidden_act", v.hidden_act, "'silu'")
    if t.hidden_act != "silu":
        fail("model.text.hidden_act", t.hidden_act, "'silu'")
    if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
        fail("model.vision.num_heads", v.num_heads, f"a divisor of hidden_size={v.hidden_size} "
              "leaving a head size divisible by 4 (2-D RoPE rotates row and column pairs)")
    unit = v.patch_size * v.spatial_merge_size
    size = tuple(v.image_size)
    if len(size) != 2 or any(s <= 0 or s % unit for s in size):
        fail("model.vision.image_size", list(size), f"[height, width] in px, positive multiples "
              f"of patch_size·spatial_merge_size = {unit}")
    validate_buckets(m)
    if v.window_size // v.spatial_merge_size // v.patch_size < 1:
        fail("model.vision.window_size", v.window_size, f"at least patch_size·spatial_merge_size = {unit}")
    bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
    if bad:
        fail("model.vision.fullatt_block_indexes", list(v.fullatt_block_indexes),
              f"block indices in [0, {v.depth - 1}]")
    if v.out_hidden_size != t.hidden_size:
        fail("model.vision.out_hidden_size", v.out_hidden_size, f"text hidden_size={t.hidden_size}")
    if t.num_heads % t.num_kv_heads:
        fail("model.text.num_kv_heads", t.num_kv_heads, f"a divisor of num_heads={t.num_heads}")
    if t.head_dim % 2:
        fail("model.text.head_dim", t.head_dim, "an even number (RoPE rotates pairs)")
    if sum(t.mrope_section) != t.head_dim // 2 or len(t.mrope_section) != 3:
        fail("model.text.mrope_section", list(t.mrope_section),
              f"three ints (t, h, w) summing to head_dim // 2 = {t.head_dim // 2}")
    if not t.initializer_range > 0:
        fail("model.text.initializer_range", t.initializer_range, "a positive float")


def validate_buckets(m) -> None:
    """`model.vision.buckets`: [height, width] px pairs, multiples of patch·merge, none with more
    merged tokens than `image_size` (its N slots are the LLM's), no duplicates."""
    v = m.vision
    unit = v.patch_size * v.spatial_merge_size
    n = n_vision_tokens(m)
    seen = set()
    for b in buckets(m):
        ok = (isinstance(b, (list, tuple)) and len(b) == 2
              and all(isinstance(x, (int, np.integer)) and x > 0 and x % unit == 0 for x in b))
        if not ok:
            fail("model.vision.buckets", _plain(v.buckets), f"[height, width] px pairs, positive "
                  f"multiples of patch_size·spatial_merge_size = {unit}; {_plain(b)} is not")
        tokens = (b[0] // unit) * (b[1] // unit)
        if tokens > n:
            fail("model.vision.buckets", _plain(v.buckets), f"grids of at most image_size "
                  f"{list(v.image_size)}'s {n} merged tokens; {list(b)} has {tokens}")
        if tuple(b) in seen:
            fail("model.vision.buckets", _plain(v.buckets), f"distinct grids; {list(b)} repeats")
        seen.add(tuple(b))


def _plain(x):
    return [_plain(y) for y in x] if isinstance(x, (list, tuple)) else x


def buckets(m) -> tuple:
    """The configured bucket sizes ((h, w) px, ...); () = one fixed grid (configs before the field)."""
    return tuple(tuple(b) if isinstance(b, (list, tuple)) else b for b in m.vision.get("buckets", ()) or ())


def with_buckets(m, sizes):
    """A copy of `m` with `vision.buckets` = sizes ([h, w] px pairs), validated."""
    m = ml_collections.ConfigDict(m.to_dict())
    m.vision.buckets = tuple(tuple(b) if isinstance(b, (list, tuple)) else b for b in sizes)
    validate(m)
    return m


def bucket_for(m, height: int, width: int) -> tuple[int, int]:
    """The bucket (h, w) px nearest an image's aspect ratio in log space (ties: the first listed)."""
    r = math.log(height / width)
    return min(buckets(m), key=lambda b: abs(math.log(b[0] / b[1]) - r))


def grid(m) -> tuple[int, int]:
    """(rows, cols) of patches of the config's fixed image size."""
    return tuple(s // m.vision.patch_size for s in m.vision.image_size)


def n_vision_tokens(m) -> int:
    gh, gw = grid(m)
    return gh * gw // m.vision.spatial_merge_size ** 2


def vision_dims(m, patch_grid=None) -> QwenVisionDims:
    """The tower's dims at `patch_grid` (rows, cols) of patches (default: `image_size`'s)."""
    v = m.vision
    gh, gw = patch_grid or grid(m)
    return QwenVisionDims(
        v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size,
        v.temporal_patch_size, v.spatial_merge_size, v.window_size, tuple(v.fullatt_block_indexes),
        v.out_hidden_size, gh, gw, v.in_channels, v.rope_theta,
        jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32, v.initializer_range)


def init_vision(m, rng, rng_projector=None) -> dict:
    """Boxed {"vision": tower, "projector": merger} (the merger is Qwen's projector; `rng`
    initialises both, `rng_projector` is unused)."""
    tower, merger = init_qwen_vision(vision_dims(m), rng)
    return {"vision": tower, "projector": merger}


def encode_image(m, params, patches):
    """patches [B, S, C·T·P·P] at `image_size`'s grid, or bucketed [B, gh/m, gw/m, m²·C·T·P·P]
    -> merged tokens [B, N, D_text] (raster order of the merged grid; a bucket's n_b tokens
    first, zeros in the N − n_b dead slots after them)."""
    patch_grid = None
    if patches.ndim == 4:
        mg = m.vision.spatial_merge_size
        b, hm, wm, c = patches.shape
        patch_grid = (hm * mg, wm * mg)
        patches = patches.reshape(b, hm * wm * mg * mg, c // (mg * mg))
    y = qwen_vision_features(vision_dims(m, patch_grid), params["vision"], params["projector"],
                             patches, remat=m.remat, unroll=m.scan_unroll)
    n = n_vision_tokens(m)
    return y if y.shape[1] == n else jnp.pad(y, ((0, 0), (0, n - y.shape[1]), (0, 0)))


def bucket_pixels(m, patches, patch_grid) -> np.ndarray:
    """Flattened patches [..., S, C·T·P·P] of a `patch_grid` (rows, cols) image -> the bucketed
    layout [..., gh/m, gw/m, m²·C·T·P·P] (a reshape: the order is already merge-block-major)."""
    mg = m.vision.spatial_merge_size
    x = np.asarray(patches)
    gh, gw = patch_grid
    return x.reshape(*x.shape[:-2], gh // mg, gw // mg, mg * mg * x.shape[-1])


def live_slots(m, patch_grid) -> np.ndarray:
    """[N] bool: the vision slots an image of `patch_grid` fills (its n_b merged tokens first)."""
    mg = m.vision.spatial_merge_size
    return np.arange(n_vision_tokens(m)) < (patch_grid[0] // mg) * (patch_grid[1] // mg)


# ----------------------------------------------------------------------------- positions

def rope_index(m, ids, mask, image_rows, patch_grid=None) -> np.ndarray:
    """M-RoPE positions [3, B, L] (int64) for an HF batch (one image grid: `patch_grid` (rows,
    cols) of patches, default `image_size`'s): HF's `get_rope_index` for still images. Padding
    keeps 0. `image_rows` [B, L] bool marks image tokens (HF's `mm_token_type_ids == 1`)."""
    b, length = ids.shape
    gh, gw = (g // m.vision.spatial_merge_size for g in (patch_grid or grid(m)))
    out = np.zeros((3, b, length), np.int64)
    for i in range(b):
        kinds = image_rows[i][mask[i]]
        cur, rows = 0, []
        for is_img, run in itertools.groupby(kinds):
            n = len(list(run))
            if not is_img:
                rows.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
                cur += n
                continue
            if n != gh * gw:
                raise ValueError(f"sample {i} has a run of {n} image tokens; the merged grid "
                                 f"{gh}×{gw} gives {gh * gw}")
            r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
            rows.append(np.stack([np.full(n, cur), cur + r.reshape(-1), cur + c.reshape(-1)]))
            cur += max(gh, gw)
        if rows:
            out[:, i, mask[i]] = np.concatenate(rows, axis=1)
    return out


def batch_grid(image_grid_thw) -> tuple[int, int]:
    """(rows, cols) of patches of a batch's images: one still-image grid for all."""
    g = np.asarray(image_grid_thw).reshape(-1, 3)
    if len(np.unique(g, axis=0)) != 1:
        raise ValueError(f"image_grid_thw {g.tolist()}: every image of a batch must have the same "
                         "grid (static shapes: resize images to one size per batch)")
    t, gh, gw = (int(x) for x in g[0])
    if t != 1:
        raise ValueError(f"image_grid_thw {g[0].tolist()}: t = {t}; only still images (t = 1) "
                         "are supported")
    return gh, gw


def with_grid(m, image_grid_thw):
    """`m` with `vision.image_size` set to the batch's grid (one compile per grid; without
    buckets the LLM's vision slots follow the grid)."""
    gh, gw = batch_grid(image_grid_thw)
    size = (gh * m.vision.patch_size, gw * m.vision.patch_size)
    if size == tuple(m.vision.image_size):
        return m
    m = ml_collections.ConfigDict(m.to_dict())
    m.vision.image_size = size
    validate(m)
    return m


def preprocess(m, image, size=None) -> np.ndarray:
    """An image (bytes, uint8 HWC array or PIL) -> its patches [S, C·T·P·P] at `size` (h, w) px,
    default the config's fixed grid: resized to it (bicubic; aspect ratio kept only as far as
    `size` has the image's: static shapes), scaled to [0, 1], normalised with CLIP's mean/std,
    patchified. With an image already of that size this is HF's `Qwen2VLImageProcessor` exactly."""
    h, w = size or m.vision.image_size
    im = decode(image)
    if im.size != (w, h):
        im = im.resize((w, h), Image.BICUBIC)
    x = (np.asarray(im, np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return patchify(m, x[None])[0]


def image_input(m, image):
    """An image -> (pixels, patch_grid): patches [S, C·T·P·P] at `image_size`'s grid and None
    without buckets; with buckets, bucketed pixels [gh/m, gw/m, m²·C·T·P·P] at the bucket
    nearest its aspect ratio and that bucket's (rows, cols) of patches."""
    if not buckets(m):
        return preprocess(m, image), None
    im = decode(image)
    size = bucket_for(m, im.height, im.width)
    patch_grid = (size[0] // m.vision.patch_size, size[1] // m.vision.patch_size)
    return bucket_pixels(m, preprocess(m, im, size), patch_grid), patch_grid


def patchify(m, images) -> np.ndarray:
    """Images [B, H, W, C] (already resized and normalised, H×W = `image_size`) -> the
    processor's flattened patches [B, S, C·T·P·P]: still images repeated over T, merge-block-major."""
    v = m.vision
    x = np.asarray(images, np.float32)
    b, h, w, c = x.shape
    p, mg, t = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
    x = x.reshape(b, h // p // mg, mg, p, w // p // mg, mg, p, c)
    x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # [B, H/pm, W/pm, m, m, C, P, P]
    x = np.broadcast_to(x[:, :, :, :, :, :, None], x.shape[:6] + (t, p, p))
    return x.reshape(b, (h // p) * (w // p), c * t * p * p)



def unpatchify(m, patches) -> np.ndarray:
    """`patchify`'s inverse for one image: patches [S, C·T·P·P] -> [H, W, C] (frame 0)."""
    v = m.vision
    (gh, gw), p, mg, t = grid(m), v.patch_size, v.spatial_merge_size, v.temporal_patch_size
    c = v.in_channels
    x = np.asarray(patches, np.float32).reshape(gh // mg, gw // mg, mg, mg, c, t, p, p)[:, :, :, :, :, 0]
    return x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, c)


# ----------------------------------------------------------------------------- input

def hf_to_inputs(m, input_ids, pixel_values=None, attention_mask=None, *, image_grid_thw=None,
                 mm_token_type_ids=None):
    """HF Qwen2.5-VL batch -> (`Inputs`, index of each text slot in `input_ids` [B, T],
    `m` for the batch's grid: the compiled shape follows it).

    `pixel_values` [Σ patches, C·T·P·P] and `image_grid_thw` [n_images, 3] as the processor gives
    them (one image per sample that has image tokens, all of one grid). `mm_token_type_ids`
    (1 at image tokens) is checked against `input_ids` when given; videos are not supported.
    With `model.vision.buckets` set, a grid of at most N = n_vision_tokens merged tokens keeps
    `m`: its tokens fill the first vision slots, the rest are dead (`Inputs.vision_valid`) and the
    pixels come bucketed ([B, gh/m, gw/m, m²·C·T·P·P]): the same LLM shape for every grid.
    """
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    is_img = (ids == m.image_token_id) & mask
    if mm_token_type_ids is not None:
        tt = np.asarray(mm_token_type_ids)
        if tt.shape != ids.shape:
            raise ValueError(f"mm_token_type_ids shape {tt.shape} != input_ids shape {ids.shape}")
        if ((tt == 2) & mask).any():
            raise ValueError("mm_token_type_ids has video tokens (2); only images are supported")
        if not np.array_equal((tt == 1) & mask, is_img):
            raise ValueError("mm_token_type_ids (1 = image) disagrees with the image tokens "
                             f"(id {m.image_token_id}) of input_ids")
    patch_grid = None  # bucketed: the batch's grid at N padded slots
    if is_img.any():
        if image_grid_thw is None or pixel_values is None:
            raise ValueError("input_ids contain image tokens but pixel_values or image_grid_thw is None")
        if buckets(m):
            patch_grid = batch_grid(image_grid_thw)
            mg = m.vision.spatial_merge_size
            n_b, n = patch_grid[0] * patch_grid[1] // mg ** 2, n_vision_tokens(m)
            if n_b > n or any(g % mg for g in patch_grid):
                raise ValueError(f"image_grid_thw grid {list(patch_grid)} has {n_b} merged tokens; "
                                 f"with model.vision.buckets set, allowed: grids of rows and cols "
                                 f"divisible by {mg} with at most image_size's {n}")
        else:
            m = with_grid(m, image_grid_thw)
    if patch_grid is not None:
        return _hf_to_inputs_bucketed(m, ids, mask, is_img, pixel_values, patch_grid)
    base, slots = hf_text_stream(m, ids, mask, n_vision_tokens(m))
    pos3 = rope_index(m, ids, mask, is_img)
    text_rope = np.take_along_axis(pos3, slots[None], axis=2).transpose(1, 0, 2)  # [B, 3, T]
    has = is_img.any(1)
    n = n_vision_tokens(m)
    vis_rope = np.zeros((len(ids), 3, n), np.int64)
    pixels = None
    if has.any():
        for i in np.flatnonzero(has):
            vis_rope[i] = pos3[:, i, is_img[i]]
        pixels = jnp.asarray(_batch_patches(vision_dims(m), pixel_values, has))
    inputs = base._replace(pixels=pixels, text_rope=jnp.asarray(text_rope, jnp.int32),
                           vision_rope=jnp.asarray(vis_rope, jnp.int32))
    return inputs, slots, m


def _batch_patches(d, pixel_values, has) -> np.ndarray:
    """The processor's patches [Σ patches, C·T·P·P] of the samples with an image -> [B, S, ·]
    (zeros for a sample without one), checked against the grid of `d`."""
    px = np.asarray(pixel_values, np.float32)
    n_img = int(has.sum())
    if px.shape != (n_img * d.num_patches, d.patch_dim):
        raise ValueError(f"pixel_values has shape {px.shape}; expected ({n_img} images × "
                         f"{d.num_patches} patches, {d.patch_dim}) for grid {d.grid_h}×{d.grid_w}")
    full = np.zeros((len(has), d.num_patches, d.patch_dim), np.float32)
    full[has] = px.reshape(n_img, d.num_patches, d.patch_dim)
    return full


def _hf_to_inputs_bucketed(m, ids, mask, is_img, pixel_values, patch_grid):
    """`hf_to_inputs` for a grid served at N padded slots (see there)."""
    d = vision_dims(m, patch_grid)
    live = live_slots(m, patch_grid)
    n_b, n = int(live.sum()), len(live)
    base, slots = hf_text_stream(m, ids, mask, n_b)
    pos3 = rope_index(m, ids, mask, is_img, patch_grid)
    text_rope = np.take_along_axis(pos3, slots[None], axis=2).transpose(1, 0, 2)  # [B, 3, T]
    has = is_img.any(1)
    vis_rope = np.zeros((len(ids), 3, n), np.int64)  # dead slots: 0 (never attended)
    for i in np.flatnonzero(has):
        vis_rope[i, :, :n_b] = pos3[:, i, is_img[i]]
    full = _batch_patches(d, pixel_values, has)
    inputs = base._replace(pixels=jnp.asarray(bucket_pixels(m, full, patch_grid)),
                           text_rope=jnp.asarray(text_rope, jnp.int32),
                           vision_rope=jnp.asarray(vis_rope, jnp.int32),
                           vision_valid=jnp.asarray(has[:, None] & live[None]))
    return inputs, slots, m


def rope_rows(m, text_pos, text_valid, image_slot: int, has_image: bool, n_vision: int,
              pixels=None) -> dict:
    """M-RoPE rows of one example ({"text_rope": [3, T], "vision_rope": [3, N]}) from its order
    positions: the full sequence (text rows at `text_pos`, the image at image_slot .. +N)
    numbered by `rope_index` (HF's `get_rope_index`). Padding rows and an absent image get 0.
    With `model.vision.buckets`, `pixels` (bucketed, [gh/m, gw/m, ·], see `image_input`) carry
    the image's grid: its n_b tokens take the first n_b slots, numbered at that grid, and
    "vision_valid" [N] marks them (the dead rest rotate by 0 and are never attended)."""
    patch_grid = None
    if buckets(m) and pixels is not None:
        mg = m.vision.spatial_merge_size
        patch_grid = (pixels.shape[0] * mg, pixels.shape[1] * mg)
    n_live = n_vision if patch_grid is None else int(live_slots(m, patch_grid).sum())
    text_pos, text_valid = np.asarray(text_pos), np.asarray(text_valid, bool)
    length = max(int(text_pos.max()) + 1, image_slot + n_vision if has_image else 0)
    mask = np.zeros(length, bool)
    mask[text_pos[text_valid]] = True
    is_img = np.zeros(length, bool)
    if has_image:
        is_img[image_slot:image_slot + n_live] = mask[image_slot:image_slot + n_live] = True
    pos3 = rope_index(m, np.zeros((1, length), np.int64), mask[None], is_img[None], patch_grid)[:, 0]
    text_rope = pos3[:, text_pos]  # padding rows: 0 (outside the mask)
    vision_rope = (pos3[:, image_slot:image_slot + n_vision] if has_image
                   else np.zeros((3, n_vision), np.int64))
    out = dict(text_rope=text_rope.astype(np.int32), vision_rope=vision_rope.astype(np.int32))
    if patch_grid is not None:
        out["vision_valid"] = live_slots(m, patch_grid) & has_image
    return out


def pixels_shape(m) -> tuple:
    d = vision_dims(m)
    return (d.num_patches, d.patch_dim)


def example_vision(m, record, text: dict, spec, has_image: bool) -> dict:
    """The data pipeline's pixels and M-RoPE rows of one example. `m` holds `vision` only (what
    the pipeline's spec carries). Patches at the fixed grid (zeros without an image); with
    buckets, bucketed pixels at the bucket nearest the image's aspect ratio (no image: the first
    bucket's shape, zeros) and `vision_valid`."""
    v = m.vision
    if has_image:
        pixels, _ = image_input(m, record["image"])
    elif buckets(m):
        size = buckets(m)[0]
        patch_grid = (size[0] // v.patch_size, size[1] // v.patch_size)
        pixels = bucket_pixels(m, np.zeros((patch_grid[0] * patch_grid[1], v.in_channels
                                            * v.temporal_patch_size * v.patch_size ** 2),
                                           np.float32), patch_grid)
    else:
        gh, gw = grid(m)
        pixels = np.zeros((gh * gw, v.in_channels * v.temporal_patch_size * v.patch_size ** 2),
                          np.float32)
    rows = rope_rows(m, text["text_pos"], text["text_valid"], int(text["image_slot"]), has_image,
                     spec.n_vision, pixels)
    return dict(pixels=pixels, **rows)


def prompt_pixels(m, image) -> np.ndarray:
    """One image -> the pixels `generate` feeds: at the fixed grid, or bucketed (`image_input`)."""
    return image_input(m, image)[0]


# ----------------------------------------------------------------------------- reports

def tower_macs(m) -> tuple:
    """(tower, merger) multiply-adds for one image of the config's fixed grid: patch embedding,
    blocks (fused qkv, out projection, SwiGLU; attention over the whole image in
    `fullatt_block_indexes`, within each window elsewhere), merger (two linears on 2×2
    neighbours)."""
    d = vision_dims(m)
    S, D, M, u = d.num_patches, d.hidden_size, d.intermediate_size, d.merge_unit
    _, sizes = window_layout(d)
    windowed = sum((n * u) ** 2 for n in sizes)  # key-query pairs inside windows
    full = len(d.fullatt_block_indexes)
    blocks = d.depth * (4 * S * D * D + 3 * S * D * M) + 2 * D * (full * S * S + (d.depth - full) * windowed)
    merger = (S // u) * (D * u) * (D * u + d.out_hidden_size)
    return S * d.patch_dim * D + blocks, merger


def token_layout(m):
    """A vision token is a merged block of the patch grid (square grids only)."""
    gh, gw = grid(m)
    if gh != gw:
        return None
    return gh // m.vision.spatial_merge_size, False, m.vision.image_size[0], lambda px: unpatchify(m, px)


# Qwen2.5-VL's special tokens (its own names; ids are ours: 0..7 as `configs/tiny_shapes_qwen.py`
# sets them). As Qwen2.5-VL-Instruct's tokenizer: no BOS, EOS = <|im_end|>, pad = <|endoftext|>.
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

FAMILY = Family(
    name=NAME, title="Qwen2.5-VL",
    validate=validate, n_vision_tokens=n_vision_tokens,
    chat_templates=("qwen2",), default_template="qwen2",
    init_vision=init_vision, encode_image=encode_image,
    hf_to_inputs=hf_to_inputs, processor_outputs=("image_grid_thw", "mm_token_type_ids"),
    preprocess=prompt_pixels, pixels_shape=pixels_shape, example_vision=example_vision,
    rope_rows=rope_rows,
    special_tokens=SPECIAL_TOKENS,
    token_roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     additional_special_tokens=[t for t in SPECIAL_TOKENS[2:] if t != "<|im_end|>"]),
    template_strings=QWEN_TEMPLATE_STRINGS,
    token_fields=(("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                  ("vision_end_token_id", "<|vision_end|>")),
    tower_macs=tower_macs, token_layout=token_layout,
    remote_code=("modeling_hidrop_qwen2_5_vl.py", "HiDropQwen2_5_VLConfig",
                 "HiDropQwen2_5_VLForConditionalGeneration"),
)
