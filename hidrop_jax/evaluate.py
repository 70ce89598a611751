"""Evaluation: answer accuracy overall and per question type, and the vision tokens per layer.

    python -m hidrop_jax.evaluate --workdir DIR [--split validation] [--schedule tok64]

Answers are scored teacher-forced: a round is correct when the argmax at every one of its answer
tokens is the reference token (shapes_vqa answers are one word, i.e. one token). HiDrop scores
its cuts from the last prompt token before each answer (the batch's query rows), so nothing after
an answer's first token influences which vision tokens are kept for it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np

from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.data.shapes import QUESTION_TYPES
from hidrop_jax.config import schedule_of, upgrade, with_schedule
from hidrop_jax.model import forward


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


def local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in its local batch order."""
    seen, rows = set(), []
    for sh in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
        key = (sh.index[0].start, sh.index[0].stop)
        if key not in seen:  # replicas over the other mesh axes hold the same rows
            seen.add(key)
            rows.append(np.asarray(sh.data))
    return np.concatenate(rows)


def _summed_over_processes(per_type: dict) -> dict:
    """{type: [correct, rounds]} added up over all processes (each scored its own shard)."""
    counts = np.array([per_type.get(t, [0, 0]) for t in QUESTION_TYPES], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    return {t: c for t, c in zip(QUESTION_TYPES, counts.tolist()) if c[1]}


def evaluate_params(cfg, params, source, tokenizer, spec, mesh, *, max_batches=None, batch_size=None):
    """Accuracy of `params` under `cfg.hidrop` on `source` (one pass, or `max_batches`); each
    process scores its shard of the data and the counts are summed."""
    from hidrop_jax.train import device_batch
    bs = batch_size or cfg.train.batch_size // cfg.train.grad_accum
    from hidrop_jax.sharding import batch_sharding
    predict = jax.jit(lambda p, x: forward(cfg, p, x).argmax(-1), out_shardings=batch_sharding(mesh))
    per_type, stats = defaultdict(lambda: [0, 0]), data_lib.Stats()
    local_bs, procs = bs // jax.process_count(), jax.process_count()
    # Every process runs the same number of steps (they are collectives): shards differ by at
    # most one record, so the short ones finish with empty (all-invalid) batches.
    n_steps = -(-(-(-len(source) // procs)) // local_bs)
    n_steps = min(n_steps, max_batches) if max_batches else n_steps
    it = data_lib.eval_batches(source, tokenizer, spec, batch_size=local_bs, stats=stats)
    batch = None
    for _ in range(n_steps):
        nxt = next(it, None)
        batch = nxt if nxt is not None else data_lib.pad_batch({k: v[:0] for k, v in batch.items()}, local_bs)
        inputs, _ = device_batch(batch, mesh)
        pred = local_rows(predict(params, inputs))
        for qtype, ok in round_results(pred, data_lib.to_inputs(batch)[1]):
            per_type[qtype][0] += ok
            per_type[qtype][1] += 1
    per_type = _summed_over_processes(per_type)
    s = schedule_of(cfg)
    correct, rounds = (sum(c[i] for c in per_type.values()) for i in (0, 1))
    return dict(
        accuracy=correct / rounds if rounds else float("nan"), rounds=rounds,
        per_type={k: dict(accuracy=c / n, rounds=n) for k, (c, n) in sorted(per_type.items())},
        schedule=cfg.hidrop.to_dict(), vision_tokens_per_layer=s.tokens_per_layer(),
        mean_vision_tokens=s.mean_tokens(), skipped_records=stats.counts["skipped"],
        truncated=stats.counts["truncated"])


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


def evaluate_torch(hf_dir, source, tokenizer, spec, *, batch_size: int = 8, max_batches=None) -> dict:
    """The same teacher-forced accuracy with PyTorch `LlavaForConditionalGeneration` loaded from
    an exported directory. HF runs all vision tokens (its LLaVA has no pruning): compare it with
    our `vanilla` schedule."""
    import torch
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    n_vis, img_id = spec.n_vision, model.config.image_token_index
    per_type, n_batches = defaultdict(list), 0
    for batch in data_lib.eval_batches(source, tokenizer, spec, batch_size=batch_size):
        ids, mask, cols = expand_image_tokens(batch, img_id, n_vis)
        has = np.asarray(batch["has_image"])
        px = np.asarray(batch["pixels"])[has].transpose(0, 3, 1, 2)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           pixel_values=torch.tensor(px) if has.any() else None).logits
        pred = np.take_along_axis(logits.argmax(-1).numpy(), cols, axis=1)
        for qtype, ok in round_results(pred, data_lib.to_inputs(batch)[1]):
            per_type[qtype].append(ok)
        n_batches += 1
        if max_batches and n_batches >= max_batches:
            break
    allr = [ok for v in per_type.values() for ok in v]
    return dict(accuracy=float(np.mean(allr)) if allr else float("nan"), rounds=len(allr),
                per_type={k: dict(accuracy=float(np.mean(v)), rounds=len(v)) for k, v in sorted(per_type.items())})


def flat(res: dict) -> dict:
    """Scalars of a result, for metric logs."""
    out = {"accuracy": res["accuracy"], "mean_vision_tokens": res["mean_vision_tokens"]}
    out.update({f"accuracy/{k}": v["accuracy"] for k, v in res["per_type"].items()})
    return out


def load_run(workdir):
    """(cfg, params) of a training run: its config.json and latest checkpoint's parameters."""
    import ml_collections
    import orbax.checkpoint as ocp
    from hidrop_jax.model import abstract_params
    workdir = Path(workdir).absolute()
    cfg_file = workdir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist: not a training workdir")
    cfg = upgrade(ml_collections.ConfigDict(json.loads(cfg_file.read_text())))
    mgr = ocp.CheckpointManager(workdir / "checkpoints")
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    target = {"params": abstract_params(cfg)}
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
        partial_restore=True)))
    return cfg, got["state"]["params"], step


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--schedule", default="", help="evaluate under another HiDrop preset")
    ap.add_argument("--out", default="", help="JSON path (default WORKDIR/eval_SPLIT[_SCHEDULE].json)")
    a = ap.parse_args(argv)
    from hidrop_jax import sharding as shard_lib
    from hidrop_jax.data.sources import load_source
    from hidrop_jax.train import data_setup
    cfg, params, step = load_run(a.workdir)
    if a.schedule:
        with_schedule(cfg, a.schedule)
    workdir = Path(a.workdir).absolute()
    tok, spec, _, _ = data_setup(cfg, workdir)
    src = load_source(cfg.data.name, a.split, cfg.data.data_dir or str(workdir / "data"),
                      manual_dir=cfg.data.manual_dir or None)
    mesh = shard_lib.make_mesh(tuple(cfg.train.mesh))
    res = evaluate_params(cfg, params, src, tok, spec, mesh)
    res.update(step=int(step), split=a.split)
    out = Path(a.out or workdir / f"eval_{a.split}{'_' + a.schedule if a.schedule else ''}.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"step {step} {a.split}: accuracy {res['accuracy']:.4f} over {res['rounds']} answers; "
          + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in res["per_type"].items())
          + f"; mean vision tokens/layer {res['mean_vision_tokens']:.1f} -> {out}")
    return res


if __name__ == "__main__":
    main()
