"""Training: optax AdamW under `jax.jit` over a device mesh, orbax checkpoints that survive crashes.

    python -m hidrop_jax.train --config configs/tiny_shapes.py:schedule=tok64 --workdir /tmp/run \
        [--config.train.steps=500 --config.data.max_len=64 ...]

A workdir that holds a checkpoint resumes from it (parameters, optimizer, step, RNG and the data
iterator's position). A non-finite loss stops the run before anything is saved, so the last good
checkpoint stays intact.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hidrop_jax import sharding as shard_lib
from hidrop_jax.config import TRAINABLE
from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.hidrop.schedule import from_config as schedule_of
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


def token_nll(logits, targets):
    """Summed negative log-likelihood over answer tokens, their count, and argmax hits."""
    mask = targets.loss_mask
    labels = jnp.where(mask, targets.labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    hits = (logits.argmax(-1) == labels) & mask
    return (nll * mask).sum(), mask.sum(), hits.sum()


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
    """Start from an imported HF model / earlier checkpoint (`hidrop_jax.convert` format); the
    architecture must match, the HiDrop schedule and training settings come from `cfg`."""
    from hidrop_jax.convert import load_checkpoint
    src_cfg, params = load_checkpoint(path)
    runtime = ("dtype", "remat", "scan_unroll", "attention_impl")  # how to run, not what to run

    def arch(m):  # nor how it was initialised (older configs lack initializer_range)
        d = {k: v for k, v in m.to_dict().items() if k not in runtime}
        d["text"] = {k: v for k, v in d["text"].items() if k != "initializer_range"}
        return d
    if arch(src_cfg.model) != arch(cfg.model):
        diff = sorted(k for k in set(arch(src_cfg.model)) | set(arch(cfg.model))
                      if arch(src_cfg.model).get(k) != arch(cfg.model).get(k))
        raise ValueError(f"train.init_from={path!r}: its architecture differs from --config's in "
                         f"model.{', model.'.join(diff)}")
    shardings = jax.tree.map(lambda x: x.sharding, state["params"])
    state["params"] = jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings)
    return state


def load_vision(cfg, state, path: str):
    """The vision tower from a HF CLIP directory (`train.init_vision`), as LLaVA starts from
    a pretrained CLIP; everything else keeps its initialisation (or `train.init_from`)."""
    from hidrop_jax.convert import load_hf_vision
    tower = load_hf_vision(cfg, path)
    shardings = jax.tree.map(lambda x: x.sharding, state["params"]["vision"])
    state["params"] = dict(state["params"], vision=jax.tree.map(jax.device_put, tower, shardings))
    return state


def checkpoint_manager(workdir: Path, t):
    import orbax.checkpoint as ocp
    opts = ocp.CheckpointManagerOptions(max_to_keep=t.keep_ckpts, create=True,
                                        enable_async_checkpointing=t.async_ckpt)
    return ocp.CheckpointManager(workdir / "checkpoints", options=opts)


def save(mgr, step: int, state, data_iter) -> None:
    """The train state and every process's data-iterator position (grain writes one file per
    process, so each host resumes its own shard)."""
    import grain.python as grain
    import orbax.checkpoint as ocp
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=grain.PyGrainCheckpointSave(data_iter)))


def restore(mgr, state, data_iter):
    """Latest checkpoint into `state`'s shapes and shardings; the data iterator resumes too."""
    import grain.python as grain
    import orbax.checkpoint as ocp
    step = mgr.latest_step()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                    data=grain.PyGrainCheckpointRestore(data_iter)))
    return got["state"], step


# ----------------------------------------------------------------------------- data

def data_setup(cfg, workdir: Path):
    """(tokenizer, spec, train source, eval source). The shapes_vqa tokenizer is built from the
    dataset vocabulary and saved in the workdir (export and generation read it there)."""
    from hidrop_jax.data.sources import load_source
    from hidrop_jax.data.tokenizer import load_tokenizer, shapes_vqa_tokenizer
    d = cfg.data
    data_dir = d.data_dir or str(workdir / "data")
    tok_dir = workdir / "tokenizer"
    if d.tokenizer:
        tok = load_tokenizer(d.tokenizer)
    elif tok_dir.exists():
        tok = load_tokenizer(str(tok_dir))
    elif d.name.startswith("shapes_vqa"):
        tok = shapes_vqa_tokenizer(str(tok_dir) if jax.process_index() == 0 else None)
    else:
        raise ValueError(f"data.tokenizer is empty; dataset {d.name!r} needs a tokenizer directory")
    if len(tok) > cfg.model.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens; model.text.vocab_size is "
                         f"{cfg.model.text.vocab_size}")
    image_id = tok.convert_tokens_to_ids("<image>")
    if image_id != cfg.model.image_token_id:
        raise ValueError(f"model.image_token_id = {cfg.model.image_token_id}, but the tokenizer's "
                         f"<image> is {image_id}")
    spec = data_lib.TextImageSpec.for_model(cfg.model, template=d.template, max_len=d.max_len,
                                            num_queries=d.num_queries)
    manual = d.manual_dir or None
    train = load_source(d.name, "train", data_dir, manual_dir=manual)
    evals = load_source(d.name, d.eval_split, data_dir, manual_dir=manual)
    return tok, spec, train, evals


def device_batch(batch: dict, mesh):
    """This process's rows -> global sharded arrays: (Inputs, Targets)."""
    inputs, targets = data_lib.to_inputs(batch)
    sh = shard_lib.batch_sharding(mesh)
    put = lambda x: None if x is None else jax.make_array_from_process_local_data(sh, np.asarray(x))
    return jax.tree.map(put, inputs), jax.tree.map(put, targets)


# ----------------------------------------------------------------------------- loop

class NonFiniteLoss(FloatingPointError):
    pass


def train(cfg, workdir) -> dict:
    """Runs (or resumes) training; returns the last metrics."""
    from hidrop_jax import evaluate as eval_lib
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    schedule_of(cfg)  # a bad schedule fails now, not at step 10,000
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size = {t.batch_size} is not divisible by train.grad_accum = {t.grad_accum}")
    mesh = shard_lib.make_mesh(tuple(t.mesh))
    lead = jax.process_index() == 0
    tok, spec, train_src, eval_src = data_setup(cfg, workdir)
    if lead:
        (workdir / "config.json").write_text(cfg.to_json(indent=1))
    tx, lr_sched = make_optimizer(t, abstract_params(cfg))
    state = init_state(cfg, mesh, tx)
    loader = data_lib.make_loader(train_src, tok, spec, global_batch_size=t.batch_size, seed=t.seed)
    data_iter = iter(loader)
    mgr = checkpoint_manager(workdir, t)
    start = 0
    if mgr.latest_step() is not None:
        state, start = restore(mgr, state, data_iter)
        log.info("resumed from step %d in %s", start, workdir)
    else:
        if cfg.train.get("init_from"):
            state = load_pretrained(cfg, state, cfg.train.init_from)
        if cfg.train.get("init_vision"):
            state = load_vision(cfg, state, cfg.train.init_vision)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jit_train_step(cfg, tx, state_sh)
    writer = _Writer(workdir, enabled=lead)
    metrics, t0, seen, compiled = {}, time.time(), 0, None
    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=start, disable=not lead, dynamic_ncols=True, desc="train")
    try:
        for step in range(start, t.steps):
            batch = next(data_iter)
            inputs, targets = device_batch(batch, mesh)
            if compiled is None:  # compiled once, ahead of time, so its memory can be reported
                with jax.set_mesh(mesh):  # the Pallas attention's shard_map reads it
                    compiled = step_fn.lower(state, inputs, targets).compile()
                if lead:
                    log.info("train step memory: %s", memory_report(compiled))
            state, m = compiled(state, inputs, targets)
            seen += int(np.asarray(batch["text_valid"]).sum())
            last = step + 1 == t.steps
            logging_now = (step + 1) % t.log_every == 0 or last
            saving_now = (step + 1) % t.ckpt_every == 0 or last
            if logging_now or saving_now:  # never log or save a state that is not finite
                m = {k: float(v) for k, v in m.items()}
                if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
                    raise NonFiniteLoss(
                        f"loss {m['loss']}, parameter norm {m['param_norm']} at step {step + 1}; "
                        f"stopping. The last good checkpoint (step {mgr.latest_step()}) in "
                        f"{workdir / 'checkpoints'} is intact.")
            if logging_now:
                dt = time.time() - t0
                m.update(step=step + 1, lr=float(lr_sched(step)), text_tokens_per_s=seen / max(dt, 1e-9),
                         skipped=loader.stats.counts["skipped"], truncated=loader.stats.counts["truncated"])
                t0, seen = time.time(), 0
                writer.write("train", m)
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['token_acc']:.2f}",
                                tok_s=f"{m['text_tokens_per_s']:.0f}")
                metrics = m
            bar.update(1)
            if (step + 1) % t.eval_every == 0 or last:
                res = eval_lib.evaluate_params(cfg, state["params"], eval_src, tok, spec, mesh,
                                               max_batches=t.eval_batches)
                writer.write("eval", dict(step=step + 1, **eval_lib.flat(res)))
            if saving_now:
                save(mgr, step + 1, state, data_iter)
    finally:
        bar.close()
        mgr.wait_until_finished()
        writer.close()
    return metrics


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
    logging.basicConfig(level=logging.INFO)
    train(cfg, FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "config file[:args]", lock_config=False)
    flags.DEFINE_string("workdir", None, "run directory (resumes if it holds a checkpoint)")
    flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process without a launcher)")
    flags.DEFINE_integer("num_processes", 1, "processes in the job (with --coordinator)")
    flags.DEFINE_integer("process_id", 0, "this process's index (with --coordinator)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host TPU VMs)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
