"""User mistakes along a run's life: each is a real command (or API call) that must fail with
one line naming the field or file and a non-zero exit code, or be refused before anything is
written; damaged checkpoints are never used, and the newest intact step is offered."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
TINY = f"{ROOT}/tests/tiny_config.py"


def _run(*args, check_rc=None):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, cwd=ROOT)
    if check_rc is not None:
        assert r.returncode == check_rc, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    return r


def _one_line_error(r, *needles):
    """rc 2, no traceback, and the last stderr line is the error naming every needle."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), r.stderr[-2000:]
    for n in needles:
        assert n in line, (n, line)
    return line


def _train(workdir, data_dir, *extra, rc=0):
    return _run("hidrop_jax.train", f"--config={TINY}:schedule=tok64", f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}", *extra, check_rc=rc)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A finished 4-step Tok64 run with checkpoints at steps 2 and 4."""
    wd = tmp_path_factory.mktemp("run") / "wd"
    _train(wd, data_dir, "--config.train.steps=4", "--config.train.ckpt_every=2")
    return wd


def _copy(run, tmp_path):
    dst = tmp_path / "wd"
    shutil.copytree(run, dst)
    return dst


# ----------------------------------------------------------------------------- training config

@pytest.mark.parametrize("override,needles", [
    ("--config.train.lr=-1", ["train.lr", "-1", "positive"]),
    ("--config.train.warmup_steps=500", ["train.warmup_steps", "500"]),
    ("--config.train.clip=0.0", ["train.clip"]),
    ("--config.data.template=v2", ["data.template", "'v2'", "v1_nosys"]),
    ("--config.hidrop.keep=(999,1)", ["hidrop.keep[0] = 999"]),
])
def test_nonsense_training_config_is_one_line(tmp_path, data_dir, override, needles):
    r = _train(tmp_path / "wd", data_dir, override, rc=None)
    _one_line_error(r, *needles)
    assert not (tmp_path / "wd" / "config.json").exists()


def test_max_len_that_truncates_every_answer_is_refused(tmp_path, data_dir):
    r = _train(tmp_path / "wd", data_dir, "--config.data.max_len=4", rc=None)
    _one_line_error(r, "data.max_len", "= 4", "no answer token")
    assert not (tmp_path / "wd" / "config.json").exists()


def test_debug_shows_the_traceback(tmp_path, data_dir):
    r = _train(tmp_path / "wd", data_dir, "--config.train.lr=-1", "--debug", rc=None)
    assert r.returncode != 0 and "Traceback" in r.stderr


# ----------------------------------------------------------------------------- relaunching a workdir

def test_relaunch_with_another_architecture_changes_nothing(run, tmp_path, data_dir):
    wd = _copy(run, tmp_path)
    before = (wd / "config.json").read_bytes()
    r = _train(wd, data_dir, "--config.model.text.intermediate_size=512", rc=None)
    _one_line_error(r, "another architecture", "model.text.intermediate_size: 128 != 512")
    assert (wd / "config.json").read_bytes() == before


def test_relaunch_with_another_schedule_needs_allow_changes(run, tmp_path, data_dir):
    wd = _copy(run, tmp_path)
    before = (wd / "config.json").read_bytes()
    r = _run("hidrop_jax.train", f"--config={TINY}:schedule=vanilla", f"--workdir={wd}",
             f"--config.data.data_dir={data_dir}", "--config.train.steps=4")
    _one_line_error(r, "another schedule", "hidrop.inject_layer", "allow_changes")
    assert (wd / "config.json").read_bytes() == before
    _run("hidrop_jax.train", f"--config={TINY}:schedule=vanilla", f"--workdir={wd}",
         f"--config.data.data_dir={data_dir}", "--config.train.steps=6",
         "--config.train.allow_changes=True", check_rc=0)
    history = [json.loads(line) for line in (wd / "history.jsonl").read_text().splitlines()]
    assert [h["from_step"] for h in history] == [0, 4]
    assert history[0]["config"]["hidrop"]["inject_layer"] == 1 and history[1]["config"]["hidrop"]["inject_layer"] == 0
    assert any(c.startswith("hidrop.inject_layer: 1 -> 0") for c in history[1]["changes"])


# ----------------------------------------------------------------------------- damaged checkpoints

def _damage(step_dir: Path, how: str):
    """Changes 16 runs of bytes spread over the largest array file of a checkpoint step (same
    size: parameters, not only optimizer moments, are hit), or truncates it."""
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    f = files[-1]
    data = bytearray(f.read_bytes())
    if how == "bytes":
        for k in range(1, 17):
            at = len(data) * k // 18
            data[at:at + 32] = bytes((b + 101) % 256 for b in data[at:at + 32])
    else:
        data = data[: len(data) // 3]
    f.write_bytes(bytes(data))
    return f


@pytest.mark.parametrize("how", ["bytes", "truncate"])
def test_damaged_step_is_refused_and_the_intact_one_offered(run, tmp_path, how):
    wd = _copy(run, tmp_path)
    _damage(wd / "checkpoints" / "4", how)
    r = _run("hidrop_jax.evaluate", f"--workdir={wd}")
    _one_line_error(r, "step 4", str(wd / "checkpoints" / "4"), "newest intact step is 2", "--step 2")
    r = _run("hidrop_jax.evaluate", f"--workdir={wd}", "--step=2", check_rc=0)
    assert "step 2 validation: accuracy" in r.stdout
    _run("hidrop_jax.convert", "export-hf", str(wd), str(tmp_path / "hf"), "--step=2", check_rc=0)
    r = _run("hidrop_jax.generate", f"--workdir={wd}", "--prompt=what color is the circle ?",
             "--max-new-tokens=2")
    _one_line_error(r, "step 4")


def test_resume_from_a_damaged_step_is_refused(run, tmp_path, data_dir):
    wd = _copy(run, tmp_path)
    _damage(wd / "checkpoints" / "4", "bytes")
    r = _train(wd, data_dir, "--config.train.steps=6", rc=None)
    _one_line_error(r, "step 4", "cannot resume")


# ----------------------------------------------------------------------------- commands and files

def test_generate_checks_arguments_before_loading(run, tmp_path):
    r = _run("hidrop_jax.generate", f"--workdir={run}", "--prompt=hi", f"--image={tmp_path}/none.jpg")
    _one_line_error(r, "--image", "none.jpg", "does not exist")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    r = _run("hidrop_jax.generate", f"--workdir={run}", "--prompt=hi", f"--image={tmp_path}/bad.jpg")
    _one_line_error(r, "--image", "bad.jpg")
    r = _run("hidrop_jax.generate", f"--workdir={run}", "--prompt=hi", f"--tokenizer={tmp_path}/tok")
    _one_line_error(r, "tokenizer directory", "tok")
    r = _run("hidrop_jax.evaluate", f"--workdir={tmp_path}/nothing")
    _one_line_error(r, "nothing")


def test_evaluate_takes_a_schedule_file(run, tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(dict(inject_layer=1, prune_after=[1], keep=[3], exit_layer=3)))
    r = _run("hidrop_jax.evaluate", f"--workdir={run}", f"--schedule={tmp_path / 's.json'}",
             f"--out={tmp_path / 'e.json'}", check_rc=0)
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["vision_tokens_per_layer"] == [0, 16, 3, 0]
    r = _run("hidrop_jax.evaluate", f"--workdir={run}", "--schedule=tok65")
    _one_line_error(r, "tok65", "neither a preset")


def test_hf_round_trip_keeps_the_runs_facts(run, tmp_path):
    """export -> import -> export: the schedule, tokenizer and chat template travel along, and
    generate --hf works on the result."""
    _run("hidrop_jax.convert", "export-hf", str(run), str(tmp_path / "hf1"), check_rc=0)
    _run("hidrop_jax.convert", "import-hf", str(tmp_path / "hf1"), str(tmp_path / "ck"), check_rc=0)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    trained = json.loads((run / "config.json").read_text())
    assert cfg["hidrop"] == trained["hidrop"] and cfg["data"]["template"] == trained["data"]["template"]
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.json").is_file()
    _run("hidrop_jax.convert", "export-hf", str(tmp_path / "ck"), str(tmp_path / "hf2"), check_rc=0)
    for f in ("hidrop_schedule.json", "hidrop_data.json", "tokenizer.json", "processor_config.json"):
        assert (tmp_path / "hf2" / f).read_text() == (tmp_path / "hf1" / f).read_text(), f
    r = _run("hidrop_jax.generate", f"--hf={tmp_path / 'hf2'}", "--prompt=how many shapes are there ?",
             "--max-new-tokens=2", check_rc=0)
    assert f"schedule {trained['hidrop']['name']}" in r.stdout


def test_a_three_step_run_is_quiet(tmp_path, data_dir):
    r = _train(tmp_path / "wd", data_dir, "--config.train.steps=3")
    info = [ln for ln in r.stderr.splitlines() if ln.startswith(("INFO", "I1", "I0"))]
    assert len(info) <= 3, info  # our own lines only (memory report), no orbax/absl chatter
