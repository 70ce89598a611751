"""Hugging Face-style batches <-> our native `Inputs` (image tokens expanded in `input_ids`).

`hf_to_inputs` is what `model.forward_hf` and `generate.generate_hf` accept; `expand_image_tokens`
is its inverse, used to run the same batch through PyTorch.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hidrop_jax.batch import Inputs
from hidrop_jax.checks import check_hf_batch
from hidrop_jax.config import n_vision_tokens


def hf_to_inputs(m, input_ids, pixel_values=None, attention_mask=None) -> tuple[Inputs, np.ndarray]:
    """HF-style batch (image token expanded n_vision times) -> (`Inputs`, index of each text
    slot in `input_ids` [B, T]).

    Positions follow HF generation: cumsum(attention_mask) − 1, so left and right padding give
    the same result. `pixel_values` is NCHW or NHWC with one row per sample, or one row per
    sample that has an image (HF's convention for a mixed batch). Bad input (ids outside the
    vocabulary, pixels without image tokens, ragged rows, ...) fails first: `checks.check_hf_batch`.
    """
    ids, mask, pixel_values = check_hf_batch(m, input_ids, pixel_values, attention_mask)
    bsz, length = ids.shape
    n = n_vision_tokens(m)
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
        pixels=None if n_img == 0 else _pixels_nhwc(m, pixel_values, counts > 0),
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
