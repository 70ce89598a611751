"""Training: optax AdamW under `jax.jit` over a device mesh, orbax checkpoints that survive crashes.

    python -m hidrop_jax.train --config configs/tiny_shapes.py:schedule=tok64 --workdir /tmp/run \
        [--config.train.steps=500 --config.data.max_len=64 ...]

A workdir that holds a checkpoint resumes from it (parameters, optimizer, step, RNG and the data
iterator's position). A non-finite loss stops the run before anything is saved, so the last good
checkpoint stays intact.

Each logged step reports, per device and over the steps since the last log (compile,
evaluation and checkpoint time left out): `step_time_s`; `tokens_per_s_per_device`, the
sequence tokens the batch holds (every row's `data.max_len` text rows, padding included, plus
its image's vision tokens: `perf.tokens_per_step`); `model_tflops_per_s_per_device`, the
analytic count (`perf.model_flops(cfg, "train")`: HiDrop's real per-layer token counts, 3× the
forward of trained parts, no remat) over the step time; and `mfu` against the chip's dense
bf16 peak (or `train.peak_tflops`), when one is known. `text_tokens_per_s` counts valid text
tokens only. `train.profile_steps=(a, b)` traces steps a..b-1 (`StepProfile`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from hidrop_jax import cli
from hidrop_jax import perf
from hidrop_jax import sharding as shard_lib
from hidrop_jax.checkpoint import (checkpoint_manager, kind_of, open_run, read_config, restore_state,
                                   save_state)
from hidrop_jax.config import (TRAINABLE, architecture_diff, resolved, schedule_of, upgrade,
                               validate_train)
from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.data.setup import open_data
from hidrop_jax.evaluate import evaluate_params
from hidrop_jax.hf.load import load_hf_vision
from hidrop_jax.layers.attention import resolve as resolve_attention
from hidrop_jax.metrics import flat, token_nll
from hidrop_jax.model import abstract_params, forward

log = logging.getLogger("hidrop_jax.train")


# ----------------------------------------------------------------------------- optimisation

def trainable_parts(trainable: str) -> set:
    """The top-level parameter groups that `train.trainable` trains. LLaVA freezes the vision
    tower in both stages."""
    if trainable not in TRAINABLE:
        raise ValueError(f"train.trainable = {trainable!r}; allowed: {TRAINABLE}")
    return {"projector": {"projector"}, "projector+llm": {"projector", "text"},
            "all": {"projector", "text", "vision"}}[trainable]


def trainable_labels(trainable: str, params):
    """'train' / 'frozen' per parameter (for `optax.multi_transform`)."""
    on = trainable_parts(trainable)
    return {k: jax.tree.map(lambda _: "train" if k in on else "frozen", v) for k, v in params.items()}


def make_optimizer(t: ml_collections.ConfigDict, params):
    """AdamW (no decay on vectors) with linear warmup + cosine decay, global-norm clipping."""
    sched = optax.warmup_cosine_decay_schedule(
        0.0, t.lr, t.warmup_steps, max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.end_lr_ratio)
    adamw = optax.adamw(sched, t.b1, t.b2, weight_decay=t.weight_decay,
                        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    tx = optax.chain(optax.clip_by_global_norm(t.clip), adamw)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 trainable_labels(t.trainable, params)), sched


def make_train_step(cfg, tx):
    """(state, inputs, targets) -> (state, metrics). The batch carries `grad_accum` micro-batches
    along its leading axis; their gradients are summed in a scan and normalised by the answer
    tokens of the whole batch, so accumulation equals one large batch."""
    accum, on = cfg.train.grad_accum, trainable_parts(cfg.train.trainable)

    def micro(params, inputs, targets):
        logits = forward(cfg, params, inputs)
        return token_nll(logits, targets)

    def step(state, inputs, targets):
        split = lambda x: None if x is None else x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        ins, tgs = jax.tree.map(split, inputs), jax.tree.map(split, targets)
        # Differentiate the trained groups only: a frozen tower's backward pass is never built.
        train_p = {k: v for k, v in state["params"].items() if k in on}
        frozen_p = {k: v for k, v in state["params"].items() if k not in on}

        def body(carry, mb):
            g_sum, nll_sum, n_sum, hit_sum = carry
            (nll, (n, hits)), g = jax.value_and_grad(
                lambda p: (lambda o: (o[0], o[1:]))(micro({**frozen_p, **p}, *mb)), has_aux=True)(train_p)
            return (jax.tree.map(jnp.add, g_sum, g), nll_sum + nll, n_sum + n, hit_sum + hits), None

        zeros = jax.tree.map(jnp.zeros_like, train_p)
        (g, nll, n, hits), _ = jax.lax.scan(body, (zeros, 0.0, 0, 0), (ins, tgs))
        denom = jnp.maximum(n, 1).astype(jnp.float32)
        g = jax.tree.map(lambda x: x / denom, g)
        full_g = {k: g[k] if k in on else jax.tree.map(jnp.zeros_like, v) for k, v in state["params"].items()}
        updates, opt_state = tx.update(full_g, state["opt_state"], state["params"])
        new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                   step=state["step"] + 1)
        metrics = dict(loss=nll / denom, tokens=n, token_acc=hits / denom, grad_norm=optax.global_norm(g),
                       param_norm=optax.global_norm(new["params"]))
        return new, metrics

    return step


# ----------------------------------------------------------------------------- state & checkpoints

def opt_shardings(tx, params, shardings, mesh):
    """The optimizer state's shardings: moments as their parameters, scalars (Adam's count)
    replicated. Single-device arrays would clash with the mesh in the jitted step (and cannot
    be placed at all when processes share the mesh)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 (frozen parts' moments)
    return optax.tree_utils.tree_map_params(
        tx, lambda x, s: x if masked(x) else s, jax.eval_shape(tx.init, params), shardings,
        transform_non_params=lambda _: replicated, is_leaf=masked)


def init_state(cfg, mesh, tx):
    """Parameters initialised into their shardings, then the optimizer state beside them."""
    params, shardings = shard_lib.sharded_init(cfg, mesh, jax.random.PRNGKey(cfg.train.seed))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings(tx, params, shardings, mesh))(params)
    step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(cfg.train.seed + 1)),
                        out_shardings=replicated)()
    return dict(params=params, opt_state=opt_state, step=step, rng=rng)


def check_init_from(cfg, path: str, kind_cfg=None) -> None:
    """`train.init_from` must hold `cfg`'s architecture (read from its config alone, so a wrong
    directory fails before the data and a 7B initialisation, not after)."""
    kind, src = kind_cfg or (kind_of(path), read_config(path))
    diff = architecture_diff(src.model, cfg.model)
    if diff:
        raise ValueError(f"train.init_from={path!r} ({kind}) has another architecture than "
                         f"--config: " + "; ".join(diff))


def abstract_state(cfg, mesh, tx):
    """`init_state`'s shapes, dtypes and shardings, nothing allocated (for ahead-of-time
    compilation on devices this host does not have: `hidrop_jax.aot`)."""
    params = abstract_params(cfg)
    shardings = shard_lib.param_shardings(cfg, mesh)
    shard_lib.check_not_replicated(shardings, params, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    step, rng = jax.eval_shape(lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(0)))
    return dict(params=jax.tree.map(sds, params, shardings),
                opt_state=jax.tree.map(sds, jax.eval_shape(tx.init, params),
                                       opt_shardings(tx, params, shardings, mesh)),
                step=sds(step, replicated), rng=sds(rng, replicated))


def jit_train_step(cfg, tx, state_shardings):
    """The jitted train step that `train` runs and `hidrop_jax.aot` compiles: the state keeps
    its shardings and is donated; the batch arrives sharded (`device_batch`)."""
    return jax.jit(make_train_step(cfg, tx), in_shardings=(state_shardings, None, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def load_pretrained(cfg, state, path: str):
    """Start from `train.init_from`: an `import-hf` checkpoint, a training workdir (its latest
    step) or a HF LLaVA directory. The architecture must match; the HiDrop schedule and the
    training settings come from `cfg`."""
    run = open_run(path)
    check_init_from(cfg, path, (run.kind, run.cfg))
    shardings = jax.tree.map(lambda x: x.sharding, state["params"])
    state["params"] = jax.tree.map(lambda a, s: jax.device_put(a, s), run.params, shardings)
    at = f" step {run.step}" if run.step is not None else ""
    log.info("initialised from %s %s%s", run.kind, path, at)
    return state


def load_vision(cfg, state, path: str):
    """The vision tower from a HF CLIP directory (`train.init_vision`), as LLaVA starts from
    a pretrained CLIP; everything else keeps its initialisation (or `train.init_from`)."""
    tower = load_hf_vision(cfg, path)
    shardings = jax.tree.map(lambda x: x.sharding, state["params"]["vision"])
    state["params"] = dict(state["params"], vision=jax.tree.map(jax.device_put, tower, shardings))
    return state


def relaunch_changes(cfg, workdir: Path) -> list:
    """What this launch changes in a workdir that already holds a run, checked before anything
    is written: another architecture is refused; another schedule or trainable set is refused
    unless `train.allow_changes` (it is then recorded in history.jsonl)."""
    f = workdir / "config.json"
    if not f.exists():
        return []
    old = upgrade(ml_collections.ConfigDict(json.loads(f.read_text())))
    diff = architecture_diff(old.model, cfg.model)
    if diff:
        raise ValueError(f"--workdir {workdir} holds a run of another architecture (nothing was "
                         f"changed): " + "; ".join(diff) + ". Use a new --workdir")
    before, now = resolved(old), resolved(cfg)
    changes = [f"hidrop.{k}: {before.hidrop.get(k)!r} -> {now.hidrop.get(k)!r}"
               for k in sorted(now.hidrop) if k != "name" and before.hidrop.get(k) != now.hidrop.get(k)]
    if old.train.trainable != cfg.train.trainable:
        changes.append(f"train.trainable: {old.train.trainable!r} -> {cfg.train.trainable!r}")
    if changes and not cfg.train.allow_changes:
        raise ValueError(f"--workdir {workdir} was trained with another schedule or trainable set "
                         f"(nothing was changed): " + "; ".join(changes) + ". Relaunch with the "
                         "run's settings, or add --config.train.allow_changes=True to continue "
                         "under the new ones (recorded in history.jsonl)")
    return changes


def record_launch(cfg, workdir: Path, changes: list) -> None:
    """config.json = the settings the run continues under; history.jsonl = every launch, so
    what earlier steps were trained with is never lost."""
    mgr_dir = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in mgr_dir.iterdir() if p.name.isdigit()) if mgr_dir.is_dir() else []
    with open(workdir / "history.jsonl", "a") as h:
        h.write(json.dumps(dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), from_step=steps[-1] if steps else 0,
                                changes=changes, config=resolved(cfg).to_dict()), default=list) + "\n")
    (workdir / "config.json").write_text(resolved(cfg).to_json(indent=1))


def check_answers_fit(cfg, source, tok, spec) -> None:
    """`data.max_len` must leave room for answers: a first batch without one answer token would
    train on nothing (loss 0) and evaluate to NaN."""
    batch = next(data_lib.eval_batches(source, tok, spec, batch_size=min(16, len(source))), None)
    if batch is not None and not np.asarray(batch["loss_mask"]).any():
        raise ValueError(f"config field `data.max_len` = {cfg.data.max_len} leaves no answer token in "
                         f"the first {len(batch['loss_mask'])} training examples (prompts are "
                         "truncated before their answers); raise it")


class Preemption:
    """SIGTERM (what Spot/preemptible TPU VMs and SLURM send before they kill) -> save at a step
    boundary and stop cleanly. With several processes JAX's preemption sync service (started by
    `jax.distributed.initialize`, it catches SIGTERM) makes all of them agree on the same step,
    read through orbax's `reached_preemption`, as MaxText does; a single process uses a plain
    signal handler."""

    def __init__(self, mgr):
        self.mgr, self.flag, self.prev = mgr, False, None
        if jax.process_count() == 1:
            self.prev = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        return self.flag if jax.process_count() == 1 else self.mgr.reached_preemption(step)

    def close(self):
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)


# ----------------------------------------------------------------------------- loop

class NonFiniteLoss(FloatingPointError):
    pass


class StepProfile:
    """`train.profile_steps` = (a, b): a `jax.profiler` trace of steps a..b-1 into
    <workdir>/profile (TensorBoard's profile plugin or Perfetto read it). Started before the
    first step of the window this launch runs (after the compile), stopped once: after step
    b-1 has finished on the device, or when training ends, fails or is preempted inside it.
    `before` and `after` return the seconds the profiler itself took (not step time)."""

    def __init__(self, window, workdir: Path):
        self.a, self.b = tuple(window) if window else (0, 0)
        self.dir, self.on, self.done = workdir / "profile", False, False

    def before(self, step: int) -> float:
        t0 = time.time()
        if not (self.on or self.done) and self.a <= step < self.b:
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir))
            self.on = True
        return time.time() - t0

    def after(self, step: int, state) -> float:
        if not (self.on and step + 1 >= self.b):
            return 0.0
        jax.block_until_ready(state)  # the window's device work belongs in the trace
        t0 = time.time()
        self.stop()
        return time.time() - t0

    def stop(self) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on, self.done = False, True
            log.info("profile of steps [%d, %d) written to %s", self.a, self.b, self.dir)


# ----------------------------------------------------------------------------- compile cache

CACHE_COUNTS = {"hits": 0, "misses": 0}  # this process's persistent-cache lookups
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                 "/jax/compilation_cache/cache_misses": "misses"}


def _count_cache_event(event: str, **_):
    if event in _CACHE_EVENTS:
        CACHE_COUNTS[_CACHE_EVENTS[event]] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def use_compile_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in `path` (local, or gs:// on a pod): a
    staged HiDrop step compiles each stage's scan body separately, minutes for a 7B model on TPU,
    and a relaunch after a preemption would pay them again. JAX only caches programs that took
    longer than `jax_persistent_cache_min_compile_time_secs` (1 s) to compile."""
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # a cache JAX already opened (another dir) is let go


def _cache_report(path: str) -> str:
    path = path or jax.config.jax_compilation_cache_dir  # or JAX_COMPILATION_CACHE_DIR
    if not path:
        return "no compile cache"
    return f"compile cache {path}: {CACHE_COUNTS['hits']} hits, {CACHE_COUNTS['misses']} misses"


def train(cfg, workdir) -> dict:
    """Runs (or resumes) training; returns the last metrics. On SIGTERM it saves the current
    step and returns early, with `metrics["preempted"]` set."""
    workdir = Path(workdir).absolute()
    t = cfg.train
    validate_train(cfg)
    schedule_of(cfg)  # a bad schedule fails now, not at step 10,000
    changes = relaunch_changes(cfg, workdir)  # before anything is written
    if t.get("init_from") and not any((workdir / "checkpoints").glob("[0-9]*")):
        check_init_from(cfg, t.init_from)  # (a resume ignores init_from)
    mesh = shard_lib.make_mesh(tuple(t.mesh))
    if t.batch_size % jax.process_count():
        raise ValueError(f"config field `train.batch_size` = {t.batch_size} is not supported; "
                         f"allowed: a multiple of the {jax.process_count()} processes")
    lead = jax.process_index() == 0
    if t.compile_cache:
        use_compile_cache(t.compile_cache)
    workdir.mkdir(parents=True, exist_ok=True)
    tok, spec, train_src, eval_src = open_data(cfg, workdir)
    check_answers_fit(cfg, train_src, tok, spec)
    if lead:
        record_launch(cfg, workdir, changes)
    tx, lr_sched = make_optimizer(t, abstract_params(cfg))
    state = init_state(cfg, mesh, tx)
    loader = data_lib.make_loader(train_src, tok, spec, global_batch_size=t.batch_size, seed=t.seed)
    data_iter = iter(loader)
    mgr = checkpoint_manager(workdir, t.keep_ckpts, t.async_ckpt)
    start = 0
    if mgr.latest_step() is not None:
        state, start = restore_state(mgr, state, data_iter)
        log.info("resumed from step %d in %s", start, workdir)
    else:
        if cfg.train.get("init_from"):
            state = load_pretrained(cfg, state, cfg.train.init_from)
        if cfg.train.get("init_vision"):
            state = load_vision(cfg, state, cfg.train.init_vision)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jit_train_step(cfg, tx, state_sh)
    writer = _Writer(workdir, enabled=lead)
    n_dev, peak = jax.device_count(), perf.peak_tflops(jax.devices(), t.peak_tflops)
    if lead:
        log.info("%s: %s TFLOP/s peak per device; %.3g model FLOPs and %d tokens per step; attention %s",
                 jax.devices()[0].device_kind, peak, perf.model_flops(cfg, "train"), perf.tokens_per_step(cfg),
                 resolve_attention(cfg.model.get("attention_impl")))
    profile = StepProfile(t.profile_steps, workdir)
    # a logging window: its first step, its start, and the seconds in it that are not training
    # steps (compile, evaluation, checkpoints), left out of the per-step figures
    metrics, compiled, win_start, t0, paused, seen = {}, {}, start, time.time(), 0.0, 0
    bar = tqdm(total=t.steps, initial=start, disable=not lead, dynamic_ncols=True, desc="train")
    preempt = Preemption(mgr)
    try:
        for step in range(start, t.steps):
            batch = next(data_iter)
            inputs, targets = shard_lib.put_batch(batch, mesh)
            shapes = _batch_shapes(inputs, targets)
            if shapes not in compiled:  # compiled ahead of time, so its memory can be reported;
                tc = time.time()        # once per batch shape (Qwen image buckets: one each)
                with jax.set_mesh(mesh):  # the Pallas attention's shard_map reads it
                    compiled[shapes] = step_fn.lower(state, inputs, targets).compile()
                compile_s = time.time() - tc
                paused += compile_s
                if lead:
                    log.info("train step compiled in %.1f s (%s); memory: %s", compile_s,
                             _cache_report(t.compile_cache), memory_report(compiled[shapes]))
            paused += profile.before(step)
            state, m = compiled[shapes](state, inputs, targets)
            paused += profile.after(step, state)
            seen += int(np.asarray(batch["text_valid"]).sum())
            preempted = preempt.reached(step + 1)  # every process, every step (a sync point)
            last = step + 1 == t.steps
            logging_now = (step + 1) % t.log_every == 0 or last or preempted
            saving_now = (step + 1) % t.ckpt_every == 0 or last or preempted
            if logging_now or saving_now:  # never log or save a state that is not finite
                m = {k: float(v) for k, v in m.items()}
                if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
                    raise NonFiniteLoss(
                        f"loss {m['loss']}, parameter norm {m['param_norm']} at step {step + 1}; "
                        f"stopping. The last good checkpoint (step {mgr.latest_step()}) in "
                        f"{workdir / 'checkpoints'} is intact.")
            if logging_now:  # the step has finished: `m` was read above
                dt = max(time.time() - t0 - paused, 1e-9)
                step_s = dt / (step + 1 - win_start)
                m.update(step=step + 1, lr=float(lr_sched(step)), text_tokens_per_s=seen / dt,
                         step_time_s=step_s, **perf.step_figures(cfg, n_dev, step_s, peak),
                         skipped=loader.stats.counts["skipped"], truncated=loader.stats.counts["truncated"],
                         compiled_step_shapes=len(compiled))
                win_start, t0, paused, seen = step + 1, time.time(), 0.0, 0
                writer.write("train", m)
                shown = dict(loss=f"{m['loss']:.3f}", acc=f"{m['token_acc']:.2f}",
                             tok_s_dev=f"{m['tokens_per_s_per_device']:.0f}",
                             tflops_dev=f"{m['model_tflops_per_s_per_device']:.3g}")
                if "mfu" in m:
                    shown["mfu"] = f"{m['mfu']:.1%}"
                bar.set_postfix(shown)
                metrics = m
            bar.update(1)
            evaluating = (step + 1) % t.eval_every == 0 or last
            if evaluating:
                jax.block_until_ready(m)  # the step's own time stays in the window, not `paused`
            tp = time.time()
            if evaluating:
                res = evaluate_params(cfg, state["params"], eval_src, tok, spec, mesh,
                                      max_batches=t.eval_batches)
                writer.write("eval", dict(step=step + 1, **flat(res)))
            if saving_now:
                save_state(mgr, step + 1, state, data_iter, force=preempted)
            paused += time.time() - tp
            if preempted and not last:
                mgr.wait_until_finished()
                log.warning("preempted (SIGTERM): saved step %d in %s; relaunch to resume",
                            step + 1, workdir / "checkpoints")
                metrics = dict(metrics, preempted=step + 1)
                break
    finally:
        profile.stop()
        preempt.close()
        bar.close()
        mgr.wait_until_finished()
        writer.close()
    return metrics


def _batch_shapes(inputs, targets):
    """The (shape, dtype) of every array of a batch: what a compiled step is specific to."""
    return tuple((tuple(x.shape), str(x.dtype)) if x is not None else None
                 for x in jax.tree.leaves((inputs, targets), is_leaf=lambda x: x is None))


def memory_report(compiled) -> str:
    """Per-device memory of a compiled step from XLA's `memory_analysis()`."""
    ma = compiled.memory_analysis()
    if ma is None:
        return "unavailable on this backend"
    mb = lambda b: f"{b / 2**20:.1f} MiB"
    return (f"arguments {mb(ma.argument_size_in_bytes)}, outputs {mb(ma.output_size_in_bytes)}, "
            f"temporaries {mb(ma.temp_size_in_bytes)}, code {mb(ma.generated_code_size_in_bytes)}")


class _Writer:
    """metrics.jsonl + TensorBoard (tensorboardX), process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter
            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, kind: str, m: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, **m}) + "\n")
        self.jsonl.flush()
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, m["step"])

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def main(argv):
    del argv
    cfg = FLAGS.config
    if FLAGS.coordinator:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    elif (FLAGS.distributed or os.environ.get("SLURM_NTASKS", "1") != "1"
          or os.environ.get("TPU_WORKER_HOSTNAMES")):
        jax.distributed.initialize()  # auto-detects TPU pods (also plain TPU VMs) and SLURM
    train(cfg, FLAGS.workdir)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags
    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "config file[:args]", lock_config=False)
    flags.DEFINE_string("workdir", None, "run directory (resumes if it holds a checkpoint)")
    flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process without a launcher)")
    flags.DEFINE_integer("num_processes", 1, "processes in the job (with --coordinator)")
    flags.DEFINE_integer("process_id", 0, "this process's index (with --coordinator)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host TPU VMs)")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run_absl(main)
