"""Hugging Face-style batches <-> our native `Inputs` (image tokens expanded in `input_ids`), for
LLaVA (`hf_to_inputs`) and Qwen2.5-VL (`qwen_hf_to_inputs`, M-RoPE rows in `Inputs.text_rope`).

`hf_to_inputs` is what `model.forward_hf` and `generate.generate_hf` accept; `expand_image_tokens`
is its inverse, used to run the same batch through PyTorch.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hidrop_jax.batch import Inputs
from hidrop_jax.checks import check_hf_batch
from hidrop_jax.config import n_vision_tokens
from hidrop_jax.families import qwen2_5_vl as qwen


def hf_to_inputs(m, input_ids, pixel_values=None, attention_mask=None) -> tuple[Inputs, np.ndarray]:
    """HF-style batch (image token expanded n_vision times) -> (`Inputs`, index of each text
    slot in `input_ids` [B, T]).

    Positions follow HF generation: cumsum(attention_mask) − 1, so left and right padding give
    the same result. `pixel_values` is NCHW or NHWC with one row per sample, or one row per
    sample that has an image (HF's convention for a mixed batch). Bad input (ids outside the
    vocabulary, pixels without image tokens, ragged rows, ...) fails first: `checks.check_hf_batch`.
    """
    ids, mask, pixel_values = check_hf_batch(m, input_ids, pixel_values, attention_mask)
    inputs, slots = hf_text_stream(m, ids, mask)
    if bool(np.asarray(inputs.has_image).any()):
        inputs = inputs._replace(pixels=_pixels_nhwc(m, pixel_values, np.asarray(inputs.has_image)))
    return inputs, slots


def hf_text_stream(m, ids, mask, n_image_tokens: int | None = None) -> tuple[Inputs, np.ndarray]:
    """The family-independent part of the adapter: the text stream, its order positions
    (cumsum(attention_mask) − 1) and the image slot, from [B, L] ids and a bool mask; no pixels.
    `n_image_tokens`: the image tokens a sample with an image has (default: n_vision_tokens)."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    bsz, length = ids.shape
    n = n_vision_tokens(m) if n_image_tokens is None else n_image_tokens
    is_img = (ids == m.image_token_id) & mask
    counts = is_img.sum(1)
    for i, c in enumerate(counts):
        if c not in (0, n):
            raise ValueError(
                f"sample {i} has {c} image tokens (id {m.image_token_id}); expected 0 or {n}: one "
                "image per sample (multiple images per sample are not supported)")
        if c and not is_img[i, np.argmax(is_img[i]):][:n].all():
            raise ValueError(f"sample {i}: its {n} image tokens are not contiguous")
    n_img = n if counts.any() else 0
    T = length - n_img
    pos_full = np.maximum(np.cumsum(mask, 1) - 1, 0)
    slots = np.zeros((bsz, T), np.int64)
    for i in range(bsz):
        keep = np.flatnonzero(~is_img[i])
        extra = len(keep) - T
        if extra:  # a text-only sample in a batch with images: drop padding to fit T slots
            pads = keep[~mask[i, keep]]
            if len(pads) < extra:
                raise ValueError(f"sample {i} has no image and {mask[i].sum()} tokens, more than "
                                 f"the {T} text slots of this batch (length {length} − {n})")
            drop = pads[:extra] if not mask[i, 0] else pads[-extra:]
            keep = np.setdiff1d(keep, drop)
        slots[i] = keep
    first_img = np.where(counts > 0, np.argmax(is_img, 1), 0)
    inputs = Inputs(
        text_ids=jnp.asarray(np.take_along_axis(ids, slots, 1), jnp.int32),
        text_pos=jnp.asarray(np.take_along_axis(pos_full, slots, 1), jnp.int32),
        text_valid=jnp.asarray(np.take_along_axis(mask, slots, 1)),
        image_slot=jnp.asarray(pos_full[np.arange(bsz), first_img], jnp.int32),
        has_image=jnp.asarray(counts > 0),
    )
    return inputs, slots


def _pixels_nhwc(m, pixel_values, has_image):
    v = m.vision
    px = np.asarray(pixel_values, np.float32)
    want = (v.image_size, v.image_size)
    if px.ndim != 4:
        raise ValueError(f"pixel_values must be 4-D (NCHW or NHWC); got shape {px.shape}")
    if px.shape[1] == v.num_channels and px.shape[-1] != v.num_channels:
        px = px.transpose(0, 2, 3, 1)
    if px.shape[1:3] != want or px.shape[3] != v.num_channels:
        raise ValueError(f"pixel_values has shape {px.shape}; expected images of "
                         f"{v.image_size}×{v.image_size}×{v.num_channels} (NCHW or NHWC)")
    if px.shape[0] == int(has_image.sum()) != len(has_image):
        full = np.zeros((len(has_image),) + px.shape[1:], np.float32)
        full[has_image] = px
        px = full
    if px.shape[0] != len(has_image):
        raise ValueError(f"pixel_values has {px.shape[0]} images for {len(has_image)} samples, "
                         f"{int(has_image.sum())} of which have image tokens")
    return jnp.asarray(px)


def expand_image_tokens(batch: dict, image_token_id: int, n_vision: int):
    """Our text stream -> HF-style (input_ids, attention_mask) with the image token repeated
    `n_vision` times at the image slot; also the column of each text row in them."""
    ids, valid = np.asarray(batch["text_ids"]), np.asarray(batch["text_valid"])
    slot, has = np.asarray(batch["image_slot"]), np.asarray(batch["has_image"])
    b, T = ids.shape
    out_ids = np.zeros((b, T + n_vision), np.int64)
    mask = np.zeros((b, T + n_vision), np.int64)
    cols = np.zeros((b, T), np.int64)
    for i in range(b):
        n = n_vision if has[i] else 0
        c = np.arange(T) + np.where(np.arange(T) >= slot[i], n, 0)
        out_ids[i, c], mask[i, c], cols[i] = ids[i], valid[i], c
        out_ids[i, slot[i]:slot[i] + n], mask[i, slot[i]:slot[i] + n] = image_token_id, 1
    return out_ids, mask, cols


def qwen_hf_to_inputs(m, input_ids, pixel_values=None, attention_mask=None, *, image_grid_thw=None,
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
        if qwen.buckets(m):
            patch_grid = qwen.batch_grid(image_grid_thw)
            mg = m.vision.spatial_merge_size
            n_b, n = patch_grid[0] * patch_grid[1] // mg ** 2, qwen.n_vision_tokens(m)
            if n_b > n or any(g % mg for g in patch_grid):
                raise ValueError(f"image_grid_thw grid {list(patch_grid)} has {n_b} merged tokens; "
                                 f"with model.vision.buckets set, allowed: grids of rows and cols "
                                 f"divisible by {mg} with at most image_size's {n}")
        else:
            m = qwen.with_grid(m, image_grid_thw)
    if patch_grid is not None:
        return _qwen_bucketed(m, ids, mask, is_img, pixel_values, patch_grid)
    base, slots = hf_text_stream(m, ids, mask)
    pos3 = qwen.rope_index(m, ids, mask, is_img)
    text_rope = np.take_along_axis(pos3, slots[None], axis=2).transpose(1, 0, 2)  # [B, 3, T]
    has = is_img.any(1)
    n = qwen.n_vision_tokens(m)
    vis_rope = np.zeros((len(ids), 3, n), np.int64)
    pixels = None
    if has.any():
        for i in np.flatnonzero(has):
            vis_rope[i] = pos3[:, i, is_img[i]]
        d = qwen.vision_dims(m)
        px = np.asarray(pixel_values, np.float32)
        n_img = int(has.sum())
        if px.shape != (n_img * d.num_patches, d.patch_dim):
            raise ValueError(f"pixel_values has shape {px.shape}; expected ({n_img} images × "
                             f"{d.num_patches} patches, {d.patch_dim}) for grid {d.grid_h}×{d.grid_w}")
        full = np.zeros((len(ids), d.num_patches, d.patch_dim), np.float32)
        full[has] = px.reshape(n_img, d.num_patches, d.patch_dim)
        pixels = jnp.asarray(full)
    inputs = base._replace(pixels=pixels, text_rope=jnp.asarray(text_rope, jnp.int32),
                           vision_rope=jnp.asarray(vis_rope, jnp.int32))
    return inputs, slots, m


def _qwen_bucketed(m, ids, mask, is_img, pixel_values, patch_grid):
    """`qwen_hf_to_inputs` for a grid served at N padded slots (see there)."""
    d = qwen.vision_dims(m, patch_grid)
    live = qwen.live_slots(m, patch_grid)
    n_b, n = int(live.sum()), len(live)
    base, slots = hf_text_stream(m, ids, mask, n_image_tokens=n_b)
    pos3 = qwen.rope_index(m, ids, mask, is_img, patch_grid)
    text_rope = np.take_along_axis(pos3, slots[None], axis=2).transpose(1, 0, 2)  # [B, 3, T]
    has = is_img.any(1)
    vis_rope = np.zeros((len(ids), 3, n), np.int64)  # dead slots: 0 (never attended)
    for i in np.flatnonzero(has):
        vis_rope[i, :, :n_b] = pos3[:, i, is_img[i]]
    px = np.asarray(pixel_values, np.float32)
    n_img = int(has.sum())
    if px.shape != (n_img * d.num_patches, d.patch_dim):
        raise ValueError(f"pixel_values has shape {px.shape}; expected ({n_img} images × "
                         f"{d.num_patches} patches, {d.patch_dim}) for grid {d.grid_h}×{d.grid_w}")
    full = np.zeros((len(ids), d.num_patches, d.patch_dim), np.float32)
    full[has] = px.reshape(n_img, d.num_patches, d.patch_dim)
    inputs = base._replace(pixels=jnp.asarray(qwen.bucket_pixels(m, full, patch_grid)),
                           text_rope=jnp.asarray(text_rope, jnp.int32),
                           vision_rope=jnp.asarray(vis_rope, jnp.int32),
                           vision_valid=jnp.asarray(has[:, None] & live[None]))
    return inputs, slots, m
