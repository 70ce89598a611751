"""Losses and scores, in one place: the trainer's token NLL, per-round answer accuracy (evaluate,
the PyTorch check) and its summary.

Answers are scored teacher-forced: a round is correct when the argmax at every one of its answer
tokens is the reference token.
"""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from hidrop_jax.data.features import QUESTION_TYPES


def token_nll(logits, targets):
    """Summed negative log-likelihood over answer tokens, their count, and argmax hits."""
    mask = targets.loss_mask
    labels = jnp.where(mask, targets.labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    hits = (logits.argmax(-1) == labels) & mask
    return (nll * mask).sum(), mask.sum(), hits.sum()


def round_results(pred, targets):
    """[(question type, correct)] for every answered round of every real example."""
    labels, mask = np.asarray(targets.labels), np.asarray(targets.loss_mask)
    rounds, types = np.asarray(targets.label_round), np.asarray(targets.round_type)
    valid = np.asarray(targets.example_valid)
    hit = (np.asarray(pred) == labels) | ~mask
    out = []
    for b in np.flatnonzero(valid):
        for r in range(types.shape[1]):
            sel = mask[b] & (rounds[b] == r)
            if sel.any() and types[b, r] >= 0:
                out.append((QUESTION_TYPES[types[b, r]], bool(hit[b][sel].all())))
    return out


def tally(results, per_type=None) -> dict:
    """Adds `round_results` pairs into {type: [correct, rounds]}."""
    per_type = defaultdict(lambda: [0, 0]) if per_type is None else per_type
    for qtype, ok in results:
        per_type[qtype][0] += ok
        per_type[qtype][1] += 1
    return per_type


def summarize(per_type: dict) -> dict:
    """{type: [correct, rounds]} -> accuracy overall and per type."""
    correct, rounds = (sum(c[i] for c in per_type.values()) for i in (0, 1))
    return dict(accuracy=correct / rounds if rounds else float("nan"), rounds=rounds,
                per_type={k: dict(accuracy=c / n, rounds=n) for k, (c, n) in sorted(per_type.items())})


def flat(res: dict) -> dict:
    """Scalars of a result, for metric logs."""
    out = {"accuracy": res["accuracy"], "mean_vision_tokens": res["mean_vision_tokens"]}
    out.update({f"accuracy/{k}": v["accuracy"] for k, v in res["per_type"].items()})
    return out
