"""Subprocess half of tests/test_sharding.py: JAX's device count is fixed when it is imported,
so every multi-device run lives in its own process.

    sharding_worker.py meshes    --batches B.npz --out DIR   # 8 simulated devices, many meshes
    sharding_worker.py guard     --batches B.npz --out DIR   # 8 simulated devices, bad rules
    sharding_worker.py multihost --batches B.npz --out DIR --port P --process-id I \
        --num-processes 2 --workdir W --data-dir D           # 2 devices per process, jax.distributed

Results go to DIR as .npz / .json; the test process compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MESHES = ((8, 1, 1), (2, 2, 2), (1, 2, 4))
SCHEDULES = ("vanilla", "tok64")
MULTIHOST_MESH = (1, 2, 2)  # fsdp across the two processes, tensor within each
MULTIHOST_SCHEDULE = "tok64"
STEPS = 2


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("meshes", "guard", "multihost"))
    p.add_argument("--out", required=True)
    p.add_argument("--batches", default="")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--workdir", default="")
    p.add_argument("--data-dir", default="")
    return p.parse_args()


ARGS = _args()
# Before jax is imported: the simulated CPU devices of this process. LLVM at -O0 halves the
# compile time of each train step (which dominates here); every run compared against another
# (one device, 8-device meshes, the two processes) uses these same flags.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={ARGS.devices}",
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import tiny_config  # noqa: E402
from hidrop_jax import sharding as shard_lib  # noqa: E402
from hidrop_jax import train as train_lib  # noqa: E402
from hidrop_jax.batch import INPUT_KEYS  # noqa: E402
from hidrop_jax.data.setup import open_data  # noqa: E402

# Plain SGD: the update is -LR * gradient, so the test reads the gradients off the parameters
# (Adam would amplify float noise in near-zero gradients to ±lr). Rate 1 would overshoot on the
# second step and magnify rounding differences.
LR = 0.1
TX = optax.sgd(LR)


_T0 = time.time()


def log(what):
    print(f"[{time.time() - _T0:6.1f}s] {what}", file=sys.stderr, flush=True)


def cfg_for(schedule: str):
    cfg = tiny_config.get_config(f"schedule={schedule}")
    cfg.train.batch_size = 8
    return cfg


def load_batches(path):
    """Global batches saved by the test: {'0/text_ids': ..., '1/text_ids': ...} -> [dict, ...]."""
    z = np.load(path)
    out = {}
    for key in z.files:
        i, name = key.split("/", 1)
        out.setdefault(int(i), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def gather(tree):
    """Every leaf whole on the host (across processes when there are several)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def flat(tree, prefix):
    return {prefix + jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def jitted_step(cfg, state):
    """The train step jitted exactly as `train_lib.train` does it."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(train_lib.make_train_step(cfg, TX), in_shardings=(state_sh, None, None),
                   out_shardings=(state_sh, None), donate_argnums=(0,))


def state_on(cfg, mesh, host_params):
    """A train state on `mesh` whose parameters are `host_params` placed by the rules table
    (initialising once and placing is cheaper here than one compiled sharded init per mesh;
    the multi-host test runs `init_state`'s sharded init)."""
    params = jax.device_put(host_params, shard_lib.param_shardings(cfg, mesh))
    rep = NamedSharding(mesh, P())
    return dict(params=params, opt_state=jax.jit(TX.init)(params),
                step=jax.device_put(np.zeros((), np.int32), rep),
                rng=jax.device_put(jax.random.PRNGKey(cfg.train.seed + 1), rep))


def run_steps(cfg, mesh, state, batches, steps):
    """`steps` train steps on `mesh`: initial params, per-step params and metrics, and each
    parameter's sharding (spec and the shape of one device's shard)."""
    layout = {jax.tree_util.keystr(p): dict(spec=[a if a is None or isinstance(a, str) else list(a)
                                                  for a in x.sharding.spec],
                                            shard=list(x.addressable_shards[0].data.shape))
              for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    out = flat(gather(state["params"]), "init/")
    out["lr"] = np.asarray(LR)
    step = jitted_step(cfg, state)
    for i in range(steps):
        inputs, targets = shard_lib.put_batch(batches[i], mesh)
        state, m = step(state, inputs, targets)
        m = gather(m)
        out.update(flat(gather(state["params"]), f"step{i + 1}/"))
        out[f"step{i + 1}/loss"] = np.asarray(m["loss"])
        out[f"step{i + 1}/grad_norm"] = np.asarray(m["grad_norm"])
    return out, layout


def meshes_mode():
    from hidrop_jax import model
    out = Path(ARGS.out)
    batches = load_batches(ARGS.batches)
    assert len(jax.devices()) == 8, jax.devices()
    layouts = {}
    # the schedule does not change the parameters: one initialisation serves both
    assert all(cfg_for(s).model.to_dict() == cfg_for(SCHEDULES[0]).model.to_dict() for s in SCHEDULES)
    host_params = jax.device_get(model.init_params(cfg_for(SCHEDULES[0]), jax.random.PRNGKey(0)))
    for schedule in SCHEDULES:
        cfg = cfg_for(schedule)
        assert cfg.train.seed == 0
        ref_mesh = shard_lib.make_mesh((1, 1, 1), jax.devices()[:1])
        # one device: the reference (two steps for tok64, which the multi-host test compares to)
        res, _ = run_steps(cfg, ref_mesh, state_on(cfg, ref_mesh, host_params), batches,
                           STEPS if schedule == MULTIHOST_SCHEDULE else 1)
        np.savez(out / f"{schedule}_1x1x1.npz", **res)
        log(f"{schedule}_1x1x1")
        for shape in MESHES:
            mesh = shard_lib.make_mesh(shape)
            res, lay = run_steps(cfg, mesh, state_on(cfg, mesh, host_params), batches, 1)
            key = f"{schedule}_{'x'.join(map(str, shape))}"
            np.savez(out / f"{key}.npz", **res)
            log(key)
            layouts[key] = lay
    (out / "layouts.json").write_text(json.dumps(layouts, indent=1))


def guard_mode():
    """The replication guard: bad rules fail on fsdp > 1 meshes, the shipped rules pass."""
    from hidrop_jax import model
    out = {}
    cfg = tiny_config.get_config("schedule=tok64")
    shapes = model.abstract_params(cfg)
    bad_rules = tuple((name, None if name in ("embed", "mlp", "heads", "kv_heads", "vocab") else ax)
                      for name, ax in shard_lib.RULES)
    for shape in ((2, 2, 2), (1, 8, 1), (1, 2, 4)):
        key = "x".join(map(str, shape))
        mesh = shard_lib.make_mesh(shape)
        # the tiny model's largest kernel has 32k elements: lower the size threshold to reach them
        shard_lib.check_not_replicated(shard_lib.param_shardings(cfg, mesh), shapes, mesh,
                                       min_elements=1024)
        out[f"good_{key}"] = "ok"
        try:
            shard_lib.check_not_replicated(shard_lib.param_shardings(cfg, mesh, bad_rules), shapes,
                                           mesh, min_elements=1024)
            out[f"bad_{key}"] = None
        except ValueError as e:
            out[f"bad_{key}"] = str(e)
    # Through sharded_init with its default threshold: a model with a 4x256x1024 MLP kernel.
    big = tiny_config.get_config("schedule=tok64")
    big.model.text.update(hidden_size=256, intermediate_size=1024)
    mesh = shard_lib.make_mesh((1, 8, 1))
    try:
        shard_lib.sharded_init(big, mesh, jax.random.PRNGKey(0), rules=bad_rules)
        out["sharded_init_bad"] = None
    except ValueError as e:
        out["sharded_init_bad"] = str(e)
    # (8, 1, 1): pure data parallelism replicates every weight by design; no error.
    mesh = shard_lib.make_mesh((8, 1, 1))
    shard_lib.check_not_replicated(shard_lib.param_shardings(cfg, mesh, bad_rules), shapes, mesh,
                                   min_elements=1024)
    out["data_only_bad_rules"] = "ok"
    for trainable in ("all", "projector"):  # "projector": the frozen parts' moments are masked
        cfg.train.trainable = trainable
        out[f"state_{trainable}"] = state_placement(cfg)
    Path(ARGS.out, "guard.json").write_text(json.dumps(out, indent=1))


def state_placement(cfg):
    """The trainer's state under its real optimizer (AdamW in multi_transform) on (2, 2, 2): every
    leaf on the mesh, moments sharded like their parameters, and the train step jitted as
    `train_lib.train` does it lowers (single-device leaves would fail here)."""
    mesh = shard_lib.make_mesh((2, 2, 2))
    tx, _ = train_lib.make_optimizer(cfg.train, train_lib.abstract_params(cfg))
    state = train_lib.init_state(cfg, mesh, tx)
    off_mesh = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
                if x.sharding.device_set != set(mesh.devices.flat)]
    sharded = lambda x: any(a is not None for a in x.sharding.spec)  # noqa: E731
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
          if jax.tree_util.keystr(p).endswith(".mu['text']['layers']['self_attn']['q_proj']['kernel']")]
    q = state["params"]["text"]["layers"]["self_attn"]["q_proj"]["kernel"]
    inputs, targets = shard_lib.put_batch(load_batches(ARGS.batches)[0], mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    jax.jit(train_lib.make_train_step(cfg, tx), in_shardings=(state_sh, None, None),
            out_shardings=(state_sh, None), donate_argnums=(0,)).lower(state, inputs, targets)
    return dict(leaves=len(jax.tree.leaves(state)), off_mesh=off_mesh, lowered=True,
                q_mu_like_param=len(mu) == 1 and mu[0].sharding == q.sharding and sharded(q),
                scalars_replicated=all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state)
                                       if x.ndim == 0))


def multihost_mode():
    """One of `num_processes` processes on localhost; each feeds its own loader's rows."""
    from hidrop_jax.data import pipeline as data_lib
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{ARGS.port}",
                               num_processes=ARGS.num_processes, process_id=ARGS.process_id,
                               initialization_timeout=60)
    pid, n = jax.process_index(), jax.process_count()
    assert (pid, n) == (ARGS.process_id, ARGS.num_processes), (pid, n)
    assert len(jax.local_devices()) == ARGS.devices and len(jax.devices()) == n * ARGS.devices
    cfg = cfg_for(MULTIHOST_SCHEDULE)
    cfg.data.data_dir = ARGS.data_dir
    tok, spec, src, _ = open_data(cfg, Path(ARGS.workdir))
    # The trainer's loader, sharded by jax.process_index() / process_count() by default.
    it = iter(data_lib.make_loader(src, tok, spec, global_batch_size=cfg.train.batch_size,
                                   seed=cfg.train.seed))
    local = [next(it) for _ in range(STEPS)]
    # Its rows must be this process's block of the global batch the single-process run saw.
    rows = slice(pid * cfg.train.batch_size // n, (pid + 1) * cfg.train.batch_size // n)
    for mine, whole in zip(local, load_batches(ARGS.batches)):
        for k in INPUT_KEYS + ("labels", "loss_mask"):
            np.testing.assert_array_equal(mine[k], whole[k][rows], err_msg=k)
    mesh = shard_lib.make_mesh(MULTIHOST_MESH)
    res, layout = run_steps(cfg, mesh, train_lib.init_state(cfg, mesh, TX), local, STEPS)
    res["process_count"] = np.asarray(n)
    res["global_devices"] = np.asarray(len(jax.devices()))
    np.savez(Path(ARGS.out) / f"multihost_{pid}.npz", **res)
    if pid == 0:
        Path(ARGS.out, "multihost_layout.json").write_text(json.dumps(layout, indent=1))
    jax.distributed.shutdown()


if __name__ == "__main__":
    {"meshes": meshes_mode, "guard": guard_mode, "multihost": multihost_mode}[ARGS.mode]()
