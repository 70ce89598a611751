"""Sharding and multi-host: every mesh computes what one device computes.

JAX fixes its device count at import, so the multi-device runs happen in subprocesses
(tests/sharding_worker.py, 8 simulated CPU devices, or 2 processes × 2 devices joined by
`jax.distributed`); they write .npz results that this process compares.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_config
from hidrop_jax.data.setup import open_data
from hidrop_jax.data import pipeline as data_lib

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
MESHES = ("8x1x1", "2x2x2", "1x2x4")
SCHEDULES = ("vanilla", "tok64")
GLOBAL_BATCH = 8  # divisible by data × fsdp of every mesh, and by the two processes
TOL = 1e-5
Q_PROJ = "['text']['layers']['self_attn']['q_proj']['kernel']"


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return env


def _worker(*args):
    return [sys.executable, str(WORKER), *map(str, args)]


def _run(args, timeout):
    try:
        p = subprocess.run(_worker(*args), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"worker {args[0]} hung for {timeout} s:\n{(e.stderr or '')[-3000:]}")
    if p.returncode:
        pytest.fail(f"worker {args[0]} failed ({p.returncode}):\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Data, tokenizer and the global batches (saved for the workers). Each global batch is the
    two processes' loader shards side by side, the rows the multi-host run feeds."""
    root = tmp_path_factory.mktemp("sharding")
    cfg = tiny_config.get_config("schedule=tok64")
    cfg.data.data_dir = str(root / "tfds")
    workdir = root / "work"
    tok, spec, src, _ = open_data(cfg, workdir)
    its = [iter(data_lib.make_loader(src, tok, spec, global_batch_size=GLOBAL_BATCH, seed=cfg.train.seed,
                                     shard_index=i, shard_count=2)) for i in range(2)]
    saved = {}
    for step in range(2):
        parts = [next(it) for it in its]
        for k in parts[0]:
            saved[f"{step}/{k}"] = np.concatenate([p[k] for p in parts])
    np.savez(root / "batches.npz", **saved)
    out = root / "out"
    out.mkdir()
    return dict(root=root, data_dir=cfg.data.data_dir, workdir=workdir, batches=root / "batches.npz",
                out=out)


@pytest.fixture(scope="module")
def meshes(run):
    """One step of every schedule on one device and on each 8-device mesh (plus a second step
    on one device for tok64, the multi-host reference)."""
    _run(("meshes", "--batches", run["batches"], "--out", run["out"]), timeout=400)
    res = {f.stem: dict(np.load(f)) for f in run["out"].glob("*_*x*x*.npz")}
    res["layouts"] = json.loads((run["out"] / "layouts.json").read_text())
    return res


def _params(res, prefix):
    return {k[len(prefix):]: v for k, v in res.items() if k.startswith(prefix + "[")}


def _grads(res):
    """SGD: step-1 params = init - lr * grads."""
    init, new = _params(res, "init/"), _params(res, "step1/")
    return {k: (init[k] - new[k]) / res["lr"] for k in init}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_meshes_give_one_device_loss_and_gradients(meshes, schedule):
    ref = meshes[f"{schedule}_1x1x1"]
    g_ref = _grads(ref)
    assert max(np.abs(g).max() for g in g_ref.values()) > 1e-2  # a real signal, not all zeros
    assert len(g_ref) > 30
    for mesh in MESHES:
        got = meshes[f"{schedule}_{mesh}"]
        assert _params(got, "init/").keys() == g_ref.keys()
        for k, v in _params(got, "init/").items():  # the same starting point, placed by the rules
            np.testing.assert_array_equal(v, _params(ref, "init/")[k], err_msg=f"{mesh} init {k}")
        assert abs(float(got["step1/loss"]) - float(ref["step1/loss"])) <= TOL, mesh
        assert abs(float(got["step1/grad_norm"]) - float(ref["step1/grad_norm"])) <= TOL * 10, mesh
        for k, g in _grads(got).items():
            np.testing.assert_allclose(g, g_ref[k], rtol=0, atol=TOL, err_msg=f"{schedule} {mesh} {k}")


@pytest.mark.slow
def test_schedules_differ(meshes):
    """tok64 really prunes in the tiny model: its loss is not vanilla's."""
    assert abs(float(meshes["tok64_1x1x1"]["step1/loss"]) - float(meshes["vanilla_1x1x1"]["step1/loss"])) > 1e-3


@pytest.mark.slow
def test_parameters_are_really_sharded(meshes):
    """The tiny model's dimensions divide the mesh axes, so nothing silently falls back to
    replication: on (2,2,2) and (1,2,4) every sizeable parameter is split, on (8,1,1) (pure data
    parallel) every parameter is whole on each device."""
    lay = meshes["layouts"]
    assert lay["tok64_2x2x2"][Q_PROJ] == dict(spec=[None, "fsdp", "tensor"], shard=[4, 32, 32])
    assert lay["tok64_1x2x4"][Q_PROJ] == dict(spec=[None, "fsdp", "tensor"], shard=[4, 32, 16])
    shapes = {k: v.shape for k, v in _params(meshes["tok64_1x1x1"], "init/").items()}
    for key, params in lay.items():
        mesh = key.split("_")[1]
        for name, p in params.items():
            if mesh == "8x1x1":
                assert p["shard"] == list(shapes[name]) and not any(p["spec"]), (key, name, p)
            elif np.prod(shapes[name]) >= 1024:
                assert np.prod(p["shard"]) < np.prod(shapes[name]), (key, name, p)


@pytest.fixture(scope="module")
def guard(run):
    """The replication guard and the train state's placement (8 devices, nothing trained)."""
    _run(("guard", "--batches", run["batches"], "--out", run["out"]), timeout=200)
    return json.loads((run["out"] / "guard.json").read_text())


def test_replication_guard_fires_on_bad_rules(guard):
    res = guard
    for mesh in ("2x2x2", "1x8x1", "1x2x4"):
        assert res[f"good_{mesh}"] == "ok"
        msg = res[f"bad_{mesh}"]
        assert msg is not None, f"bad rules passed the guard on {mesh}"
        assert "stay replicated" in msg and "hidrop_jax.sharding.RULES" in msg
        assert int(msg.split()[0]) >= 16, msg  # every kernel and embedding (8 are named)
        for name in ("embed_tokens", "gate_proj", "o_proj"):
            assert name in msg, (name, msg)
    msg = res["sharded_init_bad"]  # sharded_init itself refuses, with its default threshold
    assert msg is not None and "up_proj" in msg and "(4, 256, 1024)" in msg, msg
    assert res["data_only_bad_rules"] == "ok"  # fsdp = tensor = 1: replication is the design


def test_train_state_lives_on_the_mesh(guard):
    """init_state with the real optimizer on (2, 2, 2): parameters, Adam moments (sharded like
    their parameters), count, step and RNG all on the 8 devices, so `train`'s jitted step accepts
    the state (it used to hold single-device scalars, which no multi-device mesh accepted)."""
    st = guard["state_all"]
    assert st["leaves"] > 100 and st["off_mesh"] == [], st
    assert st["q_mu_like_param"] and st["scalars_replicated"] and st["lowered"], st
    st = guard["state_projector"]  # frozen vision and text: no moments for them
    assert 40 < st["leaves"] < guard["state_all"]["leaves"] and st["off_mesh"] == [], st
    assert not st["q_mu_like_param"] and st["scalars_replicated"] and st["lowered"], st


@pytest.mark.slow
def test_two_processes_match_single_process(run, meshes, tmp_path):
    """Two real processes on localhost, joined by jax.distributed with gloo CPU collectives, form
    one (1, 2, 2) mesh of 4 devices (fsdp across the processes); each feeds its own loader shard
    through `device_batch`, and two sharded training steps match the one-device run."""
    import portpicker
    port = portpicker.pick_unused_port()
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            args = ("multihost", "--devices", 2, "--num-processes", 2, "--process-id", i, "--port", port,
                    "--batches", run["batches"], "--out", run["out"], "--workdir", run["workdir"],
                    "--data-dir", run["data_dir"])
            with open(logs[i], "w") as f:
                procs.append(subprocess.Popen(_worker(*args), cwd=ROOT, env=_env(), stdout=f,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs) or time.monotonic() > deadline:
                break  # one failed (the other would wait on it) or both hang
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        tails = "\n".join(f"--- process {i} (exit {c}):\n" + logs[i].read_text()[-3000:]
                          for i, c in enumerate(codes))
        pytest.fail(f"multi-host run failed or hung: {tails}")

    ref = meshes["tok64_1x1x1"]
    g_ref = _grads(ref)
    for i in range(2):
        got = dict(np.load(run["out"] / f"multihost_{i}.npz"))
        assert int(got["process_count"]) == 2 and int(got["global_devices"]) == 4
        for k, v in _params(got, "init/").items():  # sharded init across processes = one device
            np.testing.assert_array_equal(v, _params(ref, "init/")[k], err_msg=f"init {k}")
        for step in (1, 2):
            assert abs(float(got[f"step{step}/loss"]) - float(ref[f"step{step}/loss"])) <= TOL, (i, step)
            ref_p = _params(ref, f"step{step}/")
            for k, v in _params(got, f"step{step}/").items():
                np.testing.assert_allclose(v, ref_p[k], rtol=0, atol=TOL, err_msg=f"process {i} step {step} {k}")
        for k, g in _grads(got).items():
            np.testing.assert_allclose(g, g_ref[k], rtol=0, atol=TOL, err_msg=f"process {i} grad {k}")
    layout = json.loads((run["out"] / "multihost_layout.json").read_text())
    assert layout[Q_PROJ] == dict(spec=[None, "fsdp", "tensor"], shard=[4, 32, 32])


@pytest.mark.slow
def test_two_process_training_evaluates_and_resumes(run):
    """The real CLI on two processes (launch/local.sh, fsdp across them): it evaluates (each
    process scores its shard; counts are summed), checkpoints each process's data position and
    resumes from it."""
    work = run["root"] / "mp_run"
    base = ["bash", str(ROOT / "launch" / "local.sh"), "--procs", "2", "--cpu-devices", "2", "--",
            f"--config={ROOT}/tests/tiny_config.py:schedule=tok64", f"--workdir={work}",
            "--config.train.mesh=(1,-1,1)", "--config.train.ckpt_every=2",
            f"--config.data.data_dir={run['data_dir']}"]
    for steps in (2, 4):
        p = subprocess.run(base + [f"--config.train.steps={steps}", f"--config.train.eval_every={steps}"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stderr[-4000:]
    evals = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit())[-1] == 4
