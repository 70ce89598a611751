"""Evaluation: answer accuracy overall and per question type, and the vision tokens per layer.

    python -m hidrop_jax.evaluate --workdir RUN [--step N] [--split validation] [--schedule tok64]

RUN is a training workdir (its latest step, or `--step`). Answers are scored teacher-forced
(`metrics.round_results`). HiDrop scores its cuts from the last prompt token before each answer
(the batch's query rows), so nothing after an answer's first token influences which vision
tokens are kept for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from hidrop_jax import cli
from hidrop_jax import sharding as shard_lib
from hidrop_jax.batch import to_inputs
from hidrop_jax.checkpoint import load_run
from hidrop_jax.config import apply_schedule, resolved, schedule_of
from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.data.features import QUESTION_TYPES
from hidrop_jax.data.setup import open_data
from hidrop_jax.data.sources import data_dir_for, load_source
from hidrop_jax.metrics import round_results, summarize, tally
from hidrop_jax.model import forward

def evaluate_params(cfg, params, source, tokenizer, spec, mesh, *, max_batches=None, batch_size=None):
    """Accuracy of `params` under `cfg.hidrop` on `source` (one pass, or `max_batches`); each
    process scores its shard of the data and the counts are summed."""
    bs = batch_size or cfg.train.batch_size // cfg.train.grad_accum
    predict = jax.jit(lambda p, x: forward(cfg, p, x).argmax(-1),
                      out_shardings=shard_lib.batch_sharding(mesh))
    per_type, stats = tally([]), data_lib.Stats()
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
        inputs, _ = shard_lib.put_batch(batch, mesh)
        pred = shard_lib.local_rows(predict(params, inputs))
        tally(round_results(pred, to_inputs(batch)[1]), per_type)
    counts = shard_lib.process_sum(np.array([per_type.get(t, [0, 0]) for t in QUESTION_TYPES], np.int64))
    s = schedule_of(cfg)
    return dict(
        summarize({t: c for t, c in zip(QUESTION_TYPES, counts.tolist()) if c[1]}),
        schedule=resolved(cfg).hidrop.to_dict(), vision_tokens_per_layer=s.tokens_per_layer(),
        mean_vision_tokens=s.mean_tokens(), skipped_records=stats.counts["skipped"],
        truncated=stats.counts["truncated"])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--step", type=int, help="the checkpoint step to evaluate (default: latest)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--schedule", default="", help="evaluate under another HiDrop schedule: a preset "
                    "name, or a JSON file such as analyze's schedule.json")
    ap.add_argument("--out", default="", help="JSON path (default WORKDIR/eval_SPLIT[_SCHEDULE].json)")
    a = ap.parse_args(argv)
    cfg, params, step = load_run(a.workdir, step=a.step)
    if a.schedule:
        apply_schedule(cfg, a.schedule)
    workdir = Path(a.workdir).absolute()
    tok, spec, _, _ = open_data(cfg, workdir)
    data_dir = data_dir_for(cfg.data.name, cfg.data.data_dir, workdir / "data")
    src = load_source(cfg.data.name, a.split, data_dir, manual_dir=cfg.data.manual_dir or None)
    mesh = shard_lib.make_mesh(tuple(cfg.train.mesh))
    res = evaluate_params(cfg, params, src, tok, spec, mesh)
    res.update(step=int(step), split=a.split)
    tag = f"_{Path(a.schedule).stem}" if a.schedule else ""
    out = Path(a.out or workdir / f"eval_{a.split}{tag}.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"step {step} {a.split}: accuracy {res['accuracy']:.4f} over {res['rounds']} answers; "
          + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in res["per_type"].items())
          + f"; mean vision tokens/layer {res['mean_vision_tokens']:.1f} -> {out}")
    return res


if __name__ == "__main__":
    cli.run(main)
