"""The same teacher-forced accuracy as `evaluate`, computed by PyTorch on an exported directory:
the independent check that an export means what the JAX model meant."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from hidrop_jax.batch import to_inputs
from hidrop_jax.data.pipeline import eval_batches
from hidrop_jax.hf.inputs import expand_image_tokens
from hidrop_jax.metrics import round_results, summarize, tally


def evaluate_torch(hf_dir, source, tokenizer, spec, *, batch_size: int = 8, max_batches=None) -> dict:
    """The same teacher-forced accuracy with PyTorch `LlavaForConditionalGeneration` loaded from
    an exported directory. HF runs all vision tokens (its LLaVA has no pruning): compare it with
    our `vanilla` schedule."""
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    n_vis, img_id = spec.n_vision, model.config.image_token_index
    per_type, n_batches = tally([]), 0
    for batch in eval_batches(source, tokenizer, spec, batch_size=batch_size):
        ids, mask, cols = expand_image_tokens(batch, img_id, n_vis)
        has = np.asarray(batch["has_image"])
        px = np.asarray(batch["pixels"])[has].transpose(0, 3, 1, 2)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           pixel_values=torch.tensor(px) if has.any() else None).logits
        pred = np.take_along_axis(logits.argmax(-1).numpy(), cols, axis=1)
        tally(round_results(pred, to_inputs(batch)[1]), per_type)
        n_batches += 1
        if max_batches and n_batches >= max_batches:
            break
    return summarize(per_type)
