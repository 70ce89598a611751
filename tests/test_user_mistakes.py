"""User mistakes, one module (issue 15): along a run's life, each is a real command that must
fail with one line naming the field or file and a non-zero exit code, or be refused before
anything is written; damaged checkpoints are never used, and the newest intact step is offered.
At the Python API (`hf_to_inputs`, `forward_hf`, `generate_hf`, `generate`): ids outside the
vocabulary, pixels without image tokens (and the reverse), ragged inputs and sequences longer
than the model's positions fail naming the argument, before anything touches the weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import tiny_config
from hidrop_jax import generate as gen_lib
from hidrop_jax.config import n_vision_tokens
from hidrop_jax.hf.inputs import hf_to_inputs
from hidrop_jax.model import _jitted_forward, forward_hf, init_params

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
    ("--config.train.b2=1.5", ["train.b2", "1.5", "[0, 1)"]),
    ("--config.train.clip=0.0", ["train.clip"]),
    ("--config.data.template=v2", ["data.template", "'v2'", "v1_nosys"]),
    ("--config.hidrop.keep=(999,)", ["hidrop.keep[0] = 999"]),
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
    """Changes 16 runs of bytes spread over every array data file of a checkpoint step (same
    sizes: parameters, not only optimizer moments, are hit), or truncates them."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, sorted(step_dir.rglob("*"))
    for f in files:
        data = bytearray(f.read_bytes())
        if how == "bytes":
            for k in range(1, 17):
                at = len(data) * k // 18
                data[at:at + 32] = bytes((b + 101) % 256 for b in data[at:at + 32])
        else:
            data = data[: len(data) // 3]
        f.write_bytes(bytes(data))


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


def test_truncated_safetensors_names_the_file(tmp_path):
    from hf_tiny import make_hf_llava
    make_hf_llava(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = _run("hidrop_jax.convert", "import-hf", str(tmp_path / "hf"), str(tmp_path / "ck"))
    _one_line_error(r, str(f), "not a readable safetensors file")
    assert not (tmp_path / "ck").exists()


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


# ----------------------------------------------------------------------------- the Python API

CFG = tiny_config.get_config()  # vocab 128, <image> = 3, 16 vision tokens, 512 positions
M = CFG.model
N = n_vision_tokens(M)
VOCAB = M.text.vocab_size


def batch(b=2):
    """A valid HF-style batch: each sample `5 6 <image>×N 7 8`, NHWC pixels."""
    ids = np.array([[5, 6] + [M.image_token_id] * N + [7, 8]] * b)
    px = np.zeros((b, M.vision.image_size, M.vision.image_size, 3), np.float32)
    return ids, px, np.ones_like(ids)


ENTRY = {
    "hf_to_inputs": lambda ids, px, mask: hf_to_inputs(M, ids, px, mask),
    "forward_hf": lambda ids, px, mask: forward_hf(CFG, None, ids, px, mask),
    "generate_hf": lambda ids, px, mask: gen_lib.generate_hf(CFG, None, ids, px, mask,
                                                             max_new_tokens=1),
}


def _set(a, idx, v):
    a = np.array(a)
    a[idx] = v
    return a


ids0, px0, mask0 = batch()
CASES = {  # name: (input_ids, pixel_values, attention_mask, error type, regex the message must match)
    "id = vocab_size": (_set(ids0, (1, 0), VOCAB), px0, mask0, ValueError,
                        rf"input_ids\[1, 0\] = {VOCAB} is outside the vocabulary; allowed: 0\.\.{VOCAB - 1}"),
    "negative id": (_set(ids0, (0, -1), -1), px0, mask0, ValueError, r"input_ids\[0, \d+\] = -1"),
    "ragged ids": ([[5, 6, 7], [5, 6]], None, None, ValueError, r"input_ids is ragged .*\[2, 3\]"),
    "float ids": (ids0.astype(np.float32), px0, mask0, TypeError, "input_ids has dtype float32"),
    "1-D ids": (ids0[0], px0[:1], None, ValueError, r"input_ids has shape \(\d+,\); expected 2"),
    "pixels, no image token": (np.array([[5, 6, 7]] * 2), px0, None, ValueError,
                               "pixel_values holds 2 image.* no image token"),
    "image tokens, no pixels": (ids0, None, mask0, ValueError,
                                "input_ids sample 0 has image tokens .* pixel_values is None"),
    "NaN pixels": (ids0, _set(px0, (1, 0, 0, 0), np.nan), mask0, ValueError, "pixel_values contains NaN"),
    "longer than positions": (np.full((1, M.text.max_position_embeddings + 1), 5), None, None,
                              ValueError, r"input_ids sample 0 has 513 tokens .*max_position_embeddings = 512"),
    "ragged mask": (ids0, px0, [[1] * ids0.shape[1], [1]], ValueError, "attention_mask is ragged"),
    "mask of 2s": (ids0, px0, mask0 * 2, ValueError, r"attention_mask holds \[2\]; allowed: 0"),
    "mask shape": (ids0, px0, mask0[:, :-1], ValueError, "attention_mask has shape .* expected input_ids' shape"),
}


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_hf_input_names_the_argument(entry, case):
    ids, px, mask, err, needle = CASES[case]
    with pytest.raises(err, match=needle):
        ENTRY[entry](ids, px, mask)


def test_empty_pixel_values_means_no_images():
    """HF's convention for a batch without images: pixel_values with 0 rows."""
    inputs, _ = hf_to_inputs(M, np.array([[5, 6, 7]]), px0[:0], None)
    assert inputs.pixels is None and not np.asarray(inputs.has_image).any()


def test_padding_beyond_positions_is_fine():
    """Only attended tokens take positions: a long, mostly padded row is not too long."""
    ids = np.full((1, M.text.max_position_embeddings + 8), 5)
    mask = np.zeros_like(ids)
    mask[0, :10] = 1
    inputs, _ = hf_to_inputs(M, ids, None, mask)
    assert int(np.asarray(inputs.text_pos).max()) == 9


def test_generate_native_inputs():
    inputs, _ = hf_to_inputs(M, *batch())
    bad = inputs._replace(text_ids=inputs.text_ids.at[0, 1].set(VOCAB + 5))
    with pytest.raises(ValueError, match=rf"inputs\.text_ids\[0, 1\] = {VOCAB + 5} is outside"):
        gen_lib.generate(CFG, None, bad, max_new_tokens=1)
    with pytest.raises(ValueError, match="has_image is True for sample 0 but inputs.pixels is None"):
        gen_lib.generate(CFG, None, inputs._replace(pixels=None), max_new_tokens=1)


@pytest.mark.slow  # one compile of the tiny model (~10 s alone, more on a busy machine)
def test_valid_input_passes_and_unchecked_ids_gave_nan():
    params = init_params(CFG, jax.random.PRNGKey(0))
    ids, px, mask = batch()
    logits = np.asarray(forward_hf(CFG, params, ids, px, mask))
    assert logits.shape == (2, 4, VOCAB) and np.isfinite(logits).all()
    # what the check prevents: the same batch with an out-of-vocabulary id, straight into the
    # model (no check on this path) gives NaN logits for that sample
    inputs, _ = hf_to_inputs(M, ids, px, mask)
    raw = np.asarray(_jitted_forward(CFG.to_json())(  # forward_hf's compiled forward
        params, inputs._replace(text_ids=inputs.text_ids.at[1, 0].set(VOCAB + 1000))))
    np.testing.assert_allclose(raw[0], logits[0], rtol=1e-5, atol=1e-5)  # the other sample unchanged
    assert np.isnan(raw[1]).all()  # the embedding lookup out of bounds fills NaN
