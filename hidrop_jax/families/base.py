"""The `Family` interface and what every family's code shares (the family-independent part of
the HF adapter, the config helpers). See `hidrop_jax.families` for the registry and the
checklist for adding a family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from hidrop_jax.batch import Inputs
from hidrop_jax.layers.common import INIT_STD


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between model families, as functions of `m` = `cfg.model`. Each family module
    builds one (`FAMILY`); `hidrop_jax.families.FAMILIES` registers it. Members that may be None
    say so; every other one is required (the constructor fails without it)."""

    name: str    # `cfg.model.family`
    title: str   # for messages ("LLaVA")

    # --- config (config.validate_model / n_vision_tokens; data.template)
    validate: Callable[[Any], None]          # (m) -> None; fails naming field, value, allowed
    n_vision_tokens: Callable[[Any], int]    # (m) -> vision tokens one image gives the LLM
    chat_templates: tuple                    # `data.template`s it is trained with
    default_template: str                    # of those, the one an import without one gets

    # --- model (model.py)
    init_vision: Callable[..., dict]         # (m, rng_tower, rng_projector) -> boxed {"vision", "projector"}
    encode_image: Callable[..., Any]         # (m, params, pixels [B, ...]) -> [B, N, D_text]

    # --- input: HF-style batches, one image, data-pipeline examples, rotation
    hf_to_inputs: Callable[..., tuple]       # (m, input_ids, pixel_values, attention_mask,
    #                                           **processor_outputs) -> (Inputs, slots [B, T], m
    #                                           for the batch: another grid = another shape)
    processor_outputs: tuple                 # the names of those **processor_outputs
    preprocess: Callable[[Any, Any], np.ndarray]  # (m, image bytes/array/PIL) -> pixels of one image
    pixels_shape: Callable[[Any], tuple]     # (m) -> shape of one sample's pixels
    example_vision: Callable[..., dict]      # (m, record, text arrays, spec, has_image) -> the
    #                                           data pipeline's "pixels" (+ rotary rows) of a sample
    # (m, text_pos, text_valid, image_slot, has_image, n_vision, pixels=None) -> {"text_rope":
    # [3, T], "vision_rope": [3, N] (+ "vision_valid" [N] where the pixels' grid leaves dead
    # slots)}: rotary positions of one sample; None = rotation is the order
    rope_rows: Optional[Callable[..., dict]]

    # --- tokenizers (data.tokenizer's word-level one; data.setup's check of a real one)
    special_tokens: tuple    # the word-level tokenizer's special tokens, ids 0.. in order (first: unk)
    token_roles: dict        # its bos/eos/pad/additional_special_tokens
    template_strings: tuple  # fixed strings its chat templates emit (vocabulary coverage)
    token_fields: tuple      # ((cfg.model field, token), ...): ids that must match the tokenizer's

    # --- reports and exports
    tower_macs: Callable[[Any], tuple]       # (m) -> (tower, projector) multiply-adds per image (perf)
    # (m) -> (tokens per side, CLS first?, image px, pixels -> [H, W, C]) to draw kept tokens on
    # the image (analysis.plots); or None where they do not form a square grid
    token_layout: Callable[[Any], Optional[tuple]]
    remote_code: tuple  # (modeling file in hidrop_jax/hf, config class, model class) for exports


def fail(field: str, value, allowed: str):
    raise ValueError(f"config field `{field}` = {value!r} is not supported; allowed: {allowed}")


def initializer_range(text) -> float:
    """`model.text.initializer_range`; configs written before the field existed mean HF's 0.02."""
    return text.get("initializer_range", INIT_STD)


def hf_text_stream(m, ids, mask, n: int) -> tuple[Inputs, np.ndarray]:
    """The family-independent part of the HF adapter: the text stream, its order positions
    (cumsum(attention_mask) − 1) and the image slot, from [B, L] ids and a bool mask, with `n`
    image tokens per image; no pixels."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    bsz, length = ids.shape
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
