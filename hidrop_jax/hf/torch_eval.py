"""The same teacher-forced accuracy as `evaluate`, computed by PyTorch on an exported directory:
the independent check that an export means what the JAX model meant."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from hidrop_jax.batch import to_inputs
from hidrop_jax.data.pipeline import eval_batches
from hidrop_jax.hf.inputs import expand_image_tokens
from hidrop_jax.metrics import round_results, summarize, tally


def evaluate_torch(hf_dir, source, tokenizer, spec, *, batch_size: int = 8, max_batches=None,
                   hidrop: bool = False) -> dict:
    """The same teacher-forced accuracy with PyTorch, from an exported directory. Plain
    `LlavaForConditionalGeneration` runs all vision tokens: compare it with our `vanilla`. With
    `hidrop`, the export's own modeling code (`trust_remote_code`) runs its schedule, scored from
    the batch's query rows as `evaluate_params` does: compare it with the trained schedule."""
    if hidrop:
        model = AutoModelForImageTextToText.from_pretrained(hf_dir, trust_remote_code=True).eval()
    else:
        model = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    queries = hidrop and hasattr(model, "set_hidrop_schedule")  # a vanilla export has no code
    n_vis, img_id = spec.n_vision, model.config.image_token_index
    per_type, n_batches = tally([]), 0
    for batch in eval_batches(source, tokenizer, spec, batch_size=batch_size):
        ids, mask, cols = expand_image_tokens(batch, img_id, n_vis)
        has = np.asarray(batch["has_image"])
        px = np.asarray(batch["pixels"])[has].transpose(0, 3, 1, 2)
        extra = {}
        if queries:  # text-stream rows -> columns of input_ids
            extra = dict(hidrop_query_index=torch.tensor(np.take_along_axis(cols, np.asarray(batch["query_idx"]), 1)),
                         hidrop_query_mask=torch.tensor(np.asarray(batch["query_valid"])))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           pixel_values=torch.tensor(px) if has.any() else None, **extra).logits
        pred = np.take_along_axis(logits.argmax(-1).numpy(), cols, axis=1)
        tally(round_results(pred, to_inputs(batch)[1]), per_type)
        n_batches += 1
        if max_batches and n_batches >= max_batches:
            break
    return summarize(per_type)
