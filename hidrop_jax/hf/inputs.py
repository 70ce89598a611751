"""Hugging Face-style batches <-> our native `Inputs` (image tokens expanded in `input_ids`).

Each family's adapter is its `Family.hf_to_inputs` (`families.llava.hf_to_inputs`,
`families.qwen2_5_vl.hf_to_inputs`: M-RoPE rows in `Inputs.text_rope`); `model.forward_hf` and
`generate.generate_hf` call it through `families.family`. Here: the names tests and scripts
import, and `expand_image_tokens`, the inverse, used to run the same batch through PyTorch.
"""

from __future__ import annotations

import numpy as np

from hidrop_jax.families import llava, qwen2_5_vl

qwen_hf_to_inputs = qwen2_5_vl.hf_to_inputs  # (Inputs, slots, m for the batch's grid)


def hf_to_inputs(m, input_ids, pixel_values=None, attention_mask=None):
    """LLaVA's adapter: (`Inputs`, index of each text slot in `input_ids` [B, T]); see
    `families.llava.hf_to_inputs`."""
    inputs, slots, _ = llava.hf_to_inputs(m, input_ids, pixel_values, attention_mask)
    return inputs, slots


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
