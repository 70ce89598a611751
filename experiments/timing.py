"""Train-step wall-clock of several HiDrop schedules of one model, side by side in one process.

    python experiments/timing.py --config configs/tiny_shapes.py --schedules '{"tok64": {"name": "tok64"}}' \
        [--repeats 10] --out timing.json

The experiments' training runs share a noisy 2-core machine with other jobs, so their own wall
clocks say little about a schedule's cost. This pass times the training step (forward +
backward + AdamW, the config's trainable parts, `train.batch_size` samples of `data.max_len`
text rows and one image each) of every schedule *and vanilla* on the same parameters and inputs,
interleaved: each round times one step of every schedule in turn, so a load spike hits all of
them alike; the result is the median per schedule and its ratio to vanilla's (as
`benchmarks/speed.py`, which times them one after the other).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.tables import apply_sets  # noqa: E402
from hidrop_jax.batch import Inputs, Targets  # noqa: E402
from hidrop_jax.config import load_config, schedule_of, with_schedule  # noqa: E402
from hidrop_jax.model import init_params  # noqa: E402
from hidrop_jax.train import make_optimizer, make_train_step  # noqa: E402


def make_batch(cfg, seed: int = 0):
    """A batch with the training batch's static shapes: B prompts of `max_len` rows, the image
    slot after 8 rows, `num_queries` answer rounds (query rows and labelled answer rows)."""
    rng = np.random.default_rng(seed)
    b, t, q = cfg.train.batch_size, cfg.data.max_len, cfg.data.num_queries
    n, size = schedule_of(cfg).n_vision, cfg.model.vision.image_size
    ids = rng.integers(5, cfg.model.text.vocab_size, (b, t)).astype(np.int32)
    slot = min(8, t - 1)
    pos = np.arange(t) + np.where(np.arange(t) >= slot, n, 0)
    qrows = np.linspace(slot + 1, t - 2, q).astype(np.int32)
    mask = np.zeros((b, t), bool)
    mask[:, qrows + 1] = True
    rounds = np.zeros((b, t), np.int32)
    rounds[:, qrows + 1] = np.arange(q)
    labels = np.where(mask, np.roll(ids, -1, axis=1), -100).astype(np.int32)
    inputs = Inputs(jnp.asarray(ids), jnp.asarray(np.broadcast_to(pos, (b, t)).astype(np.int32)),
                    jnp.ones((b, t), bool), jnp.full((b,), slot, jnp.int32), jnp.ones((b,), bool),
                    jnp.asarray(rng.normal(size=(b, size, size, 3)).astype(np.float32)),
                    jnp.asarray(np.broadcast_to(qrows, (b, q)).copy()), jnp.ones((b, q), bool))
    targets = Targets(jnp.asarray(labels), jnp.asarray(mask), jnp.asarray(rounds),
                      jnp.zeros((b, q), jnp.int32), jnp.ones((b,), bool))
    return inputs, targets


def _config(spec: str, sets):
    cfg = load_config(spec)
    apply_sets(cfg, sets)
    return cfg


def measure(config: str, schedules: dict, repeats: int, sets=()) -> dict:
    """{key: median train-step seconds} for `schedules` ({key: cfg.hidrop fields}) and
    "vanilla", on the same parameters and batch, interleaved round by round."""
    schedules = {"vanilla": {"name": "vanilla"}, **schedules}
    base = _config(config, sets)
    params = init_params(with_schedule(_config(config, sets), "vanilla"), jax.random.PRNGKey(0))
    steps = {}
    for key, fields in schedules.items():
        cfg = _config(config, sets)
        f = dict(fields)
        with_schedule(cfg, f.pop("name"), **f)
        tx, _ = make_optimizer(cfg.train, params)
        state = dict(params=params, opt_state=jax.jit(tx.init)(params), step=jnp.zeros((), jnp.int32),
                     rng=jax.random.PRNGKey(1))
        inputs, targets = make_batch(cfg)
        fn = jax.jit(make_train_step(cfg, tx)).lower(state, inputs, targets).compile()
        jax.block_until_ready(fn(state, inputs, targets))  # warm-up
        steps[key] = (fn, state, inputs, targets)
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, (fn, state, inputs, targets) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, inputs, targets)[1]["loss"])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(config=config, batch_size=base.train.batch_size, text_rows=base.data.max_len,
                repeats=repeats, cpu_count=os.cpu_count(), device=str(jax.devices()[0]),
                step_s=med, ratio={k: v / med["vanilla"] for k, v in med.items()},
                schedules=schedules, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="config file[:args] (its model and batch)")
    ap.add_argument("--schedules", required=True, help='JSON {key: {"name": preset, field: value}}')
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = measure(a.config, json.loads(a.schedules), a.repeats, a.set)
    Path(a.out).write_text(json.dumps(res, indent=1))
    for k in res["step_s"]:
        print(f"{k:45s} {res['step_s'][k]:.4f} s  {res['ratio'][k]:.3f}× vanilla")


if __name__ == "__main__":
    main()
