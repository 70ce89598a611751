"""Checks of what the Python API is given, before anything is traced (issue 15).

Without them bad input gives a wrong answer or a foreign error: an id ≥ vocab_size is looked up
out of bounds (NaN logits), pixels without image tokens are silently ignored, a ragged list
fails in numpy ("inhomogeneous shape") without naming the argument. Each error here names the
argument, the value and what is allowed.

    check_hf_batch(m, input_ids, pixel_values, attention_mask)   # model.hf_to_inputs
    check_inputs(m, inputs)                                       # generate.check_inputs

`m` is the model config (`cfg.model`).
"""

from __future__ import annotations

import numpy as np


_KINDS = {"iu": "integers", "iub": "integers or booleans", "iubf": "numbers"}


def as_array(name: str, x, *, kind: str = "iub", ndim: int | None = None) -> np.ndarray:
    """`x` as a rectangular numpy array whose dtype kind is in `kind` (numpy's codes: i int,
    u unsigned, b bool, f float); ValueError for ragged input, TypeError for another dtype."""
    try:
        a = np.asarray(x)
    except ValueError:  # numpy refuses ragged nested lists
        a = None
    if a is None or a.dtype == object:
        lengths = None
        try:
            lengths = sorted({len(row) for row in x})
        except TypeError:
            pass
        raise ValueError(f"{name} is ragged (rows of lengths {lengths}); pad the rows to one "
                         "length and mark the padding with attention_mask")
    if a.dtype.kind not in kind:
        raise TypeError(f"{name} has dtype {a.dtype}; allowed: {_KINDS.get(kind, kind)}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} has shape {a.shape}; expected {ndim} dimensions"
                         + (" [batch, length] (add a batch axis for one sample)" if ndim == 2 else ""))
    return a


def check_token_ids(m, name: str, ids) -> None:
    """Every id in [0, vocab_size): an id outside would be looked up out of bounds."""
    ids = np.asarray(ids)
    vocab = m.text.vocab_size
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}{list(where)} = {int(ids[where])} is outside the vocabulary; "
                         f"allowed: 0..{vocab - 1} (model.text.vocab_size = {vocab}); "
                         f"{int(bad.sum())} such id(s)")


def check_hf_batch(m, input_ids, pixel_values=None, attention_mask=None):
    """An HF-style batch (see `model.hf_to_inputs`) -> (ids [B, L], mask bool [B, L], pixels or
    None) as numpy, after checking shapes, ids, the mask, image tokens vs pixels and the
    model's position limit."""
    ids = as_array("input_ids", input_ids, kind="iu", ndim=2)
    if ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {ids.shape}: no tokens")
    check_token_ids(m, "input_ids", ids)
    if attention_mask is None:
        mask = np.ones(ids.shape, bool)
    else:
        mask = as_array("attention_mask", attention_mask, kind="iub", ndim=2)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; expected input_ids' shape "
                             f"{ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask holds {sorted(set(np.unique(mask).tolist()) - {0, 1})}; "
                             "allowed: 0 (padding) and 1")
        mask = mask.astype(bool)
    has_tokens = ((ids == m.image_token_id) & mask).any(1)
    if pixel_values is not None:
        px = as_array("pixel_values", pixel_values, kind="iubf")
        n_px = px.shape[0] if px.ndim else 1
        if n_px and not has_tokens.any():  # (an empty pixel_values is HF's "no images")
            raise ValueError(
                f"pixel_values holds {n_px} image(s) but input_ids has no "
                f"image token (id {m.image_token_id} = model.image_token_id): the images would be "
                "ignored; put the image tokens in the prompt (the processor expands <image>) or "
                "drop pixel_values")
        if px.dtype.kind == "f" and not np.isfinite(px).all():
            raise ValueError("pixel_values contains NaN or infinite values")
    elif has_tokens.any():
        i = int(np.argmax(has_tokens))
        raise ValueError(f"input_ids sample {i} has image tokens (id {m.image_token_id}) but "
                         "pixel_values is None")
    else:
        px = None
    limit = m.text.max_position_embeddings
    used = mask.sum(1)  # positions are cumsum(mask) - 1; image tokens take positions too
    if used.max() > limit:
        i = int(np.argmax(used))
        raise ValueError(f"input_ids sample {i} has {int(used[i])} tokens (image tokens "
                         f"included); model.text.max_position_embeddings = {limit} allows at "
                         f"most {limit}")
    return ids, mask, px


def check_inputs(m, inputs) -> None:
    """The model's native batch (`model.Inputs`): ids in the vocabulary, pixels when a sample
    has an image. (Pixels with no has_image are allowed here: the data pipeline's batches carry
    blank images for text-only samples, and has_image says which to use.)"""
    check_token_ids(m, "inputs.text_ids", inputs.text_ids)
    has_image = np.asarray(inputs.has_image)
    if inputs.pixels is None and has_image.any():
        raise ValueError(f"inputs.has_image is True for sample {int(np.argmax(has_image))} but "
                         "inputs.pixels is None")
