"""Training: overfitting, gradient accumulation, crash-safe resume, non-finite stop, bad config."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import tiny_config
from hidrop_jax import sharding as shard_lib
from hidrop_jax import train as train_lib
from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.batch import to_inputs
from hidrop_jax.checkpoint import load_run
from hidrop_jax.data.setup import open_data
from hidrop_jax.metrics import token_nll

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _cfg(data_dir, arg="schedule=tok64", **train):
    cfg = tiny_config.get_config(arg)
    cfg.data.data_dir = data_dir
    cfg.train.update(train)
    return cfg


def _setup(cfg, tmp_path):
    tok, spec, src, _ = open_data(cfg, tmp_path)
    batch = next(iter(data_lib.make_loader(src, tok, spec, global_batch_size=cfg.train.batch_size)))
    mesh = shard_lib.make_mesh(tuple(cfg.train.mesh))
    tx, _ = train_lib.make_optimizer(cfg.train, train_lib.abstract_params(cfg))
    return batch, mesh, tx


def test_overfits_a_fixed_batch(data_dir, tmp_path):
    cfg = _cfg(data_dir, warmup_steps=1, steps=1000)  # a constant-ish learning rate
    batch, mesh, tx = _setup(cfg, tmp_path)
    state = train_lib.init_state(cfg, mesh, tx)
    step = jax.jit(train_lib.make_train_step(cfg, tx))
    inputs, targets = shard_lib.put_batch(batch, mesh)
    losses = []
    for _ in range(40):
        state, m = step(state, inputs, targets)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] / 5, losses


def test_gradient_accumulation_equals_one_batch(data_dir, tmp_path):
    """Plain SGD with rate 1 makes the update the gradient itself (Adam would amplify float
    noise in near-zero gradients to ±lr)."""
    import optax
    cfg1 = _cfg(data_dir, grad_accum=1)
    batch, mesh, _ = _setup(cfg1, tmp_path)
    inputs, targets = shard_lib.put_batch(batch, mesh)
    tx = optax.sgd(1.0)
    out = []
    for accum in (1, 2):
        cfg = _cfg(data_dir, grad_accum=accum)
        state = train_lib.init_state(cfg, mesh, tx)
        state, m = jax.jit(train_lib.make_train_step(cfg, tx))(state, inputs, targets)
        out.append((state["params"], float(m["loss"])))
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), out[0][0], out[1][0])


def test_frozen_parts_do_not_move(data_dir, tmp_path):
    cfg = _cfg(data_dir, trainable="projector")
    batch, mesh, tx = _setup(cfg, tmp_path)
    state = train_lib.init_state(cfg, mesh, tx)
    before = jax.device_get(state["params"])
    step = jax.jit(train_lib.make_train_step(cfg, tx))
    for _ in range(2):  # the warmup's first learning rate is 0
        state, _ = step(state, *shard_lib.put_batch(batch, mesh))
    after = jax.device_get(state["params"])
    for part in ("vision", "text"):
        jax.tree.map(np.testing.assert_array_equal, before[part], after[part])
    assert not np.array_equal(before["projector"]["linear_1"]["kernel"], after["projector"]["linear_1"]["kernel"])


def test_frozen_groups_are_not_differentiated_and_updates_are_unchanged(data_dir, tmp_path):
    """The step differentiates only the trained groups; the reference differentiates every
    parameter and lets the optimizer zero the frozen ones (what LLaVA trainers do)."""
    import optax
    from hidrop_jax.model import forward
    cfg = _cfg(data_dir, trainable="projector+llm", warmup_steps=1)
    batch, mesh, tx = _setup(cfg, tmp_path)
    state = train_lib.init_state(cfg, mesh, tx)
    inputs, targets = shard_lib.put_batch(batch, mesh)

    def reference(state):
        def loss(p):
            nll, n, _ = token_nll(forward(cfg, p, inputs), targets)
            return nll / n
        g = jax.grad(loss)(state["params"])
        updates, _ = tx.update(g, state["opt_state"], state["params"])
        return optax.apply_updates(state["params"], updates)

    want = jax.device_get(jax.jit(reference)(state))
    lowered = jax.jit(train_lib.make_train_step(cfg, tx)).lower(state, inputs, targets)
    got, _ = lowered.compile()(state, inputs, targets)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), jax.device_get(got["params"]), want)
    # the patch embedding is the only convolution: forward only, no transposed (backward) ones
    n_conv = lowered.as_text().count("stablehlo.convolution")
    assert n_conv == 1, n_conv


def test_init_vision_starts_from_a_clip_tower_and_keeps_it_frozen(data_dir, tmp_path):
    """Stage 2 from a pretrained CLIP (`train.init_vision`): the run's tower is the file's,
    unchanged after training, while the LLM moved; a tower of another size is refused."""
    from flax.core import meta
    from hidrop_jax.hf.save import save_hf_vision
    from hidrop_jax.layers.clip import init_vision
    from hidrop_jax.model import vision_dims
    cfg = _cfg(data_dir, trainable="projector+llm", steps=3, ckpt_every=3)
    tower = jax.device_get(meta.unbox(init_vision(vision_dims(cfg.model), jax.random.PRNGKey(7))))
    save_hf_vision(tmp_path / "clip", cfg, tower)
    init = jax.device_get(train_lib.init_state(cfg, shard_lib.make_mesh((1, 1, 1)), _setup(cfg, tmp_path)[2])["params"])
    cfg.train.init_vision = str(tmp_path / "clip")
    train_lib.train(cfg, tmp_path / "run")
    _, params, _ = load_run(tmp_path / "run")
    jax.tree.map(np.testing.assert_array_equal, params["vision"], tower)
    assert not np.allclose(params["text"]["embed_tokens"]["embedding"], init["text"]["embed_tokens"]["embedding"])
    wide = _cfg(data_dir, steps=1)
    wide.model.vision.intermediate_size = 96
    wide.train.init_vision = str(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"intermediate_size = 64 \(config: 96\)"):
        train_lib.train(wide, tmp_path / "wide")


def _train_cmd(workdir, data_dir, steps, ckpt_every=2, *extra):
    return [sys.executable, "-m", "hidrop_jax.train", f"--config={ROOT}/tests/tiny_config.py",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={steps}", f"--config.train.ckpt_every={ckpt_every}",
            "--config.train.keep_ckpts=50", *extra]


STEPS = 16
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """An uninterrupted run of STEPS steps: what an interrupted and resumed one must equal."""
    ref = tmp_path_factory.mktemp("ref")
    subprocess.run(_train_cmd(ref, data_dir, STEPS), check=True, env=ENV, capture_output=True)
    return load_run(ref)[1]


def _steps_saved(run):
    return sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())


def _resume_and_compare(run, data_dir, reference_run, kept, *extra, env=ENV):
    """Relaunches the run to STEPS, checks it equals the uninterrupted one; returns the relaunch."""
    done = subprocess.run(_train_cmd(run, data_dir, STEPS, 2, *extra), check=True, env=env,
                          capture_output=True, text=True)
    after = _steps_saved(run)
    assert set(kept) <= set(after) and after[-1] == STEPS  # nothing lost, run completed
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 reference_run, load_run(run)[1])
    return done


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(data_dir, tmp_path, reference_run):
    run = tmp_path / "run"
    p = subprocess.Popen(_train_cmd(run, data_dir, STEPS), env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "6").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "training finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    kept = _steps_saved(run)
    assert kept and kept[-1] < STEPS
    _resume_and_compare(run, data_dir, reference_run, kept)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes_exactly(data_dir, tmp_path, reference_run):
    """Preemption (Spot TPU VMs, SLURM send SIGTERM before they kill): the trainer saves the
    step it is at, newer than the last periodic checkpoint, exits cleanly, and a relaunch
    reaches the uninterrupted run's parameters. With `train.compile_cache`, the relaunch takes
    its train step from JAX's persistent cache instead of compiling it again."""
    run = tmp_path / "run"
    cache = f"--config.train.compile_cache={tmp_path / 'jax_cache'}"
    env = dict(ENV, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the tiny step compiles fast
    p = subprocess.Popen(_train_cmd(run, data_dir, STEPS, 8, "--config.train.log_every=1", cache),
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while p.poll() is None and time.time() < deadline and not (
            metrics.exists() and '"step": 9,' in metrics.read_text()):
        time.sleep(0.02)
    assert p.poll() is None, "training finished before it could be preempted"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    kept = _steps_saved(run)
    assert kept[0] == 8 and 9 <= kept[-1] < STEPS and len(kept) == 2, kept  # periodic 8 + the preempted step
    assert f"preempted (SIGTERM): saved step {kept[-1]}" in err
    assert re.search(r"train step compiled .*: 0 hits, [1-9]\d* misses", err), err[-3000:]
    relaunch = _resume_and_compare(run, data_dir, reference_run, kept, cache, env=env)
    assert re.search(r"train step compiled .*: [1-9]\d* hits, 0 misses", relaunch.stderr), relaunch.stderr[-3000:]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    cfg = _cfg(data_dir, lr=1e30, warmup_steps=1, steps=8, ckpt_every=1, log_every=1, async_ckpt=False)
    with pytest.raises(train_lib.NonFiniteLoss, match="is intact") as e:
        train_lib.train(cfg, tmp_path)
    _, params, step = load_run(tmp_path)
    assert f"step {step})" in str(e.value)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("field,value,needle", [
    ("trainable", "everything", "train.trainable` = 'everything'"),
    ("grad_accum", 3, r"train.batch_size` = 4 .* a multiple of train.grad_accum = 3"),
    ("mesh", (3, 1, 1), r"mesh shape \(3, 1, 1\) needs 3 devices"),
])
def test_bad_train_config_fails_at_start(data_dir, tmp_path, field, value, needle):
    cfg = _cfg(data_dir, **{field: value})
    with pytest.raises(ValueError, match=needle):
        train_lib.train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_schedule_fails_at_start(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    cfg.hidrop.keep = (99,)  # tok64 at 4 layers has one cut; 16 tokens are available
    with pytest.raises(ValueError, match=r"hidrop.keep\[0\] = 99"):
        train_lib.train(cfg, tmp_path)


def test_trained_workdir_exports_and_pytorch_agrees(data_dir, tmp_path):
    """`export-hf` takes a training workdir (weights + its tokenizer); PyTorch then gives the
    JAX vanilla logits on a real validation batch, and the same teacher-forced accuracy."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from hidrop_jax import evaluate as eval_lib
    from hidrop_jax.hf.inputs import expand_image_tokens
    from hidrop_jax.hf.torch_eval import evaluate_torch
    from hidrop_jax.convert import main as convert_main
    from hidrop_jax.model import forward
    cfg = _cfg(data_dir, "schedule=vanilla", steps=2, ckpt_every=2)
    train_lib.train(cfg, tmp_path / "run")
    convert_main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert AutoProcessor.from_pretrained(tmp_path / "hf").tokenizer.convert_tokens_to_ids("<image>") == 3
    cfg, params, _ = load_run(tmp_path / "run")
    tok, spec, _, src = open_data(cfg, tmp_path / "run")
    batch = next(data_lib.eval_batches(src, tok, spec, batch_size=4))
    ours = np.asarray(forward(cfg, params, to_inputs(batch)[0]))
    ids, mask, cols = expand_image_tokens(batch, 3, spec.n_vision)
    has = np.asarray(batch["has_image"])
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(np.asarray(batch["pixels"])[has].transpose(0, 3, 1, 2))).logits
    ref = np.take_along_axis(ref.numpy(), cols[..., None], axis=1)
    valid = np.asarray(batch["text_valid"])
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    mesh = shard_lib.make_mesh((-1, 1, 1))
    jax_acc = eval_lib.evaluate_params(cfg, params, src, tok, spec, mesh, batch_size=4)
    torch_acc = evaluate_torch(tmp_path / "hf", src, tok, spec, batch_size=4)
    assert jax_acc["rounds"] == torch_acc["rounds"] > 0
    assert jax_acc["accuracy"] == pytest.approx(torch_acc["accuracy"])
