"""The batch contract between data, model, training and evaluation (a leaf: jax and numpy only).

`Inputs` is the model's native batch, `Targets` what the loss and the scorer read; the data
pipeline produces dicts with these keys (`to_inputs`). Query rows say which prompt rows score
the HiDrop cuts.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp


class Inputs(NamedTuple):
    """The model's native batch. Shapes are static; nothing depends on data for its shape."""
    text_ids: jax.Array      # [B, T] int32, right-padded text stream (no image tokens)
    text_pos: jax.Array      # [B, T] int32 persistent positions (text after the image +n_vision)
    text_valid: jax.Array    # [B, T] bool
    image_slot: jax.Array    # [B] int32, position of the first of the n_vision reserved slots
    has_image: jax.Array     # [B] bool; a sample without one keeps its vision slots masked out
    pixels: Optional[jax.Array] = None       # [B, H, W, C] float; None = text-only batch
    query_idx: Optional[jax.Array] = None    # [B, Q] int32 text-stream rows scoring the cuts
    query_valid: Optional[jax.Array] = None  # [B, Q] bool; None = last valid prompt token
    # Rotation, where it differs from the order above (M-RoPE, see hidrop_jax.families): rows
    # (t, h, w) of the text stream [B, 3, T] and of the n_vision slots [B, 3, N] (batch-major, as
    # every field: batches shard, split into micro-batches and stack along axis 0). None (LLaVA):
    # tokens rotate by their order. A kept vision token keeps its own rotary position.
    text_rope: Optional[jax.Array] = None
    vision_rope: Optional[jax.Array] = None
    # [B, N] bool: vision slots holding an image token. False = a dead slot (an image bucket with
    # fewer tokens than N): never attended, never kept while a live one is dropped, no loss.
    # None: every slot of a sample with an image is live (the fixed grid; LLaVA).
    vision_valid: Optional[jax.Array] = None


class Targets(NamedTuple):
    labels: Any        # [B, T] int32, IGNORE where loss_mask is False
    loss_mask: Any     # [B, T] bool
    label_round: Any   # [B, T] int32
    round_type: Any    # [B, Q] int32
    example_valid: Any  # [B] bool


INPUT_KEYS = ("text_ids", "text_pos", "text_valid", "image_slot", "has_image", "pixels",
              "query_idx", "query_valid")
ROPE_KEYS = ("text_rope", "vision_rope")  # only in batches of M-RoPE families
OPTIONAL_KEYS = ROPE_KEYS + ("vision_valid",)  # vision_valid: only in bucketed batches


def to_inputs(batch: dict, *, with_pixels: bool = True):
    """A batch -> (`Inputs`, `Targets`), numpy arrays (wrap with jnp, or shard with
    `sharding.put_batch`)."""
    kw = {k: batch[k] for k in INPUT_KEYS}
    kw.update({k: batch[k] for k in OPTIONAL_KEYS if k in batch})
    if not with_pixels:
        kw["pixels"] = None
    return Inputs(**kw), Targets(batch["labels"], batch["loss_mask"], batch["label_round"],
                                 batch["round_type"], batch["example_valid"])


def last_prompt_row(inputs: Inputs):
    """Inference query row: the valid text token with the largest position, [B, 1]."""
    idx = jnp.argmax(jnp.where(inputs.text_valid, inputs.text_pos, -1), axis=1)
    return idx[:, None].astype(jnp.int32), inputs.text_valid.any(axis=1, keepdims=True)


def first_query_row(inputs: Inputs):
    """[B] int32: the first round's query row if the batch has query rows, else the last valid
    text row (the inference query row). The layer-choice analysis reads attention from here."""
    last = last_prompt_row(inputs)[0][:, 0]
    if inputs.query_idx is None:
        return last
    q = jnp.asarray(inputs.query_idx)[:, 0].astype(jnp.int32)
    return jnp.where(jnp.asarray(inputs.query_valid)[:, 0], q, last)
