"""Training, evaluating, generating and analysing a Qwen2.5-VL model on shapes_vqa.

What could fail: the `qwen2` template renders another text than Qwen2.5-VL-Instruct's own chat
template (so a fine-tuned hub model would see unfamiliar prompts); the pipeline's M-RoPE rows
differ from transformers' `get_rope_index` on the same token sequence; the answers are not
where the labels are; training does not lower the loss, or writes a checkpoint that evaluate,
generate or analyze cannot read; a sharded run computes another loss.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from hidrop_jax import train as train_lib
from hidrop_jax.batch import to_inputs
from hidrop_jax.checkpoint import load_run
from hidrop_jax.config import load_config
from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.data import shapes
from hidrop_jax.data.pipeline import IGNORE
from hidrop_jax.data.setup import open_data
from hidrop_jax.hf.inputs import expand_image_tokens
from hidrop_jax.metrics import token_nll
from hidrop_jax.model import forward, init_params

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_shapes_qwen.py")
DATA = "shapes_vqa:train=64,validation=16,test=16"

# Qwen2-VL / Qwen2.5-VL-Instruct's `chat_template.json` from the hub, verbatim (transformers 5.24
# does not ship it: `Qwen2_5_VLProcessor(chat_template=None)` in
# transformers/models/qwen2_5_vl/processing_qwen2_5_vl.py:36 takes it from the checkpoint).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _cfg(data_dir, **train):
    cfg = load_config(f"{CONFIG}:schedule=tok64")
    cfg.model.text.num_layers = 4  # the preset rescales; a faster compile
    cfg.data.update(name=DATA, data_dir=data_dir)
    cfg.train.update(dict(steps=8, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1,
                          eval_every=1000, eval_batches=1, ckpt_every=8, async_ckpt=False), **train)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def opened(data_dir, tmp_path_factory):
    cfg = _cfg(data_dir)
    tok, spec, train_src, eval_src = open_data(cfg, tmp_path_factory.mktemp("w"))
    return cfg, tok, spec, train_src, eval_src


def _messages(questions, answers, has_image):
    out = []
    for r, (q, a) in enumerate(zip(questions, answers)):
        image = [{"type": "image"}] if has_image and r == 0 else []
        out += [{"role": "user", "content": image + [{"type": "text", "text": q}]},
                {"role": "assistant", "content": a}]
    return out


@pytest.mark.parametrize("index", [0, 2, 3, 7])  # with text_only_frac 0.5, 7 has no image
def test_template_is_qwen_chat_template(opened, index):
    """Our encoding (text rows + the N image tokens at the image slot) = the hub chat template
    rendered by transformers' `apply_chat_template`, `<|image_pad|>` repeated N times as the
    processor does, tokenized; and the labels are exactly the tokens of "{answer}<|im_end|>"."""
    cfg, tok, spec, _, _ = opened
    ex = shapes.make_example(0, "train", index, text_only_frac=0.5)  # index 7: text-only
    conv = ex["conversations"]
    if index == 7:
        assert not ex["has_image"]
    enc = data_lib.encode_example(ex, tok, spec)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    text = tok.apply_chat_template(_messages(conv["question"], conv["answer"], ex["has_image"]),
                                   tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * spec.n_vision)
    want = tok(text, add_special_tokens=False)["input_ids"]
    batch = {k: v[None] for k, v in enc.items()}
    ids, mask, _ = expand_image_tokens(batch, cfg.model.image_token_id, spec.n_vision)
    assert not enc["truncated"]
    assert ids[0][mask[0].astype(bool)].tolist() == want
    # labels: the answer and its <|im_end|>, nothing else
    end = tok.convert_tokens_to_ids("<|im_end|>")
    labelled = enc["labels"][enc["labels"] != IGNORE].tolist()
    answers = [t for a in conv["answer"] for t in tok(a, add_special_tokens=False)["input_ids"] + [end]]
    assert labelled == answers


def test_mrope_rows_equal_hf_get_rope_index(opened):
    """The pipeline's M-RoPE rows = transformers' `Qwen2_5_VLModel.get_rope_index` on the
    expanded ids of a batch with and without images."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    cfg, tok, spec, train_src, _ = opened
    m = cfg.model
    batch = next(data_lib.eval_batches(train_src, tok, spec, batch_size=8))
    ex = shapes.make_example(0, "train", 7, text_only_frac=0.5)  # a text-only sample too
    extra = data_lib.encode_example(ex, tok, spec)
    batch = {k: np.concatenate([v, extra[k][None]]) for k, v in batch.items() if k in extra}
    assert batch["has_image"].any() and not batch["has_image"].all()
    hf_cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=m.text.vocab_size, hidden_size=32, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=32, patch_size=m.vision.patch_size,
                           spatial_merge_size=m.vision.spatial_merge_size,
                           temporal_patch_size=2, tokens_per_second=2, window_size=112),
        image_token_id=m.image_token_id, video_token_id=m.video_token_id,
        vision_start_token_id=m.vision_start_token_id, vision_end_token_id=m.vision_end_token_id)
    ids, mask, cols = expand_image_tokens(batch, m.image_token_id, spec.n_vision)
    gh, gw = (s // m.vision.patch_size for s in m.vision.image_size)
    thw = torch.tensor([[1, gh, gw]] * int(batch["has_image"].sum()))
    ref, _ = Qwen2_5_VLModel(hf_cfg).get_rope_index(
        torch.tensor(ids), torch.tensor((ids == m.image_token_id).astype(np.int64)), thw,
        attention_mask=torch.tensor(mask))
    ref = ref.numpy()
    for i in range(len(ids)):
        valid = batch["text_valid"][i]
        np.testing.assert_array_equal(batch["text_rope"][i][:, valid], ref[:, i, cols[i][valid]])
        if batch["has_image"][i]:
            s = batch["image_slot"][i]
            np.testing.assert_array_equal(batch["vision_rope"][i], ref[:, i, s:s + spec.n_vision])
    # and it is M-RoPE: after the 8×8 merged image the text resumes at start + 8, not start + 64
    i = int(np.flatnonzero(batch["has_image"])[0])
    s = batch["image_slot"][i]
    assert batch["text_rope"][i][0, s] == s + 8


# ----------------------------------------------------------------------------- a training run

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    cfg = _cfg(data_dir)
    metrics = train_lib.train(cfg, work)
    return cfg, work, metrics


def _loss(cfg, params, batch):
    inputs, targets = to_inputs(batch)
    def f(p, x, t):
        nll, n, _ = token_nll(forward(cfg, p, x), t)
        return nll / n
    return float(jax.jit(f)(params, inputs, targets))


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_run_is_readable(trained, opened, tmp_path, capsys):
    from hidrop_jax import evaluate, generate
    cfg, work, metrics = trained
    _, tok, spec, train_src, _ = opened
    assert np.isfinite(metrics["loss"])
    batch = next(data_lib.eval_batches(train_src, tok, spec, batch_size=4))
    before = _loss(cfg, init_params(cfg, jax.random.PRNGKey(cfg.train.seed)), batch)
    run_cfg, params, step = load_run(str(work))
    assert step == cfg.train.steps and run_cfg.model.family == "qwen2_5_vl"
    after = _loss(cfg, params, batch)
    assert after < before - 0.5, (before, after)
    res = evaluate.main(["--workdir", str(work)])
    assert res["rounds"] > 0 and 0 <= res["accuracy"] <= 1
    img = tmp_path / "img.jpg"
    img.write_bytes(shapes.make_example(0, "test", 0)["image"])
    capsys.readouterr()
    generate.main(["--workdir", str(work), "--image", str(img), "--prompt",
                   "what color is the circle ?", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "tokens generated" in out and "vision tokens" in out


@pytest.mark.slow
def test_analyze_proposes_a_schedule_evaluate_accepts(trained, data_dir, tmp_path):
    from hidrop_jax import analyze, evaluate
    cfg, work, _ = trained
    # The layers it picks depend on the curves of this barely trained model, and a budget must
    # lie between what that layout needs and what it can use: the first budget that fits.
    for budget in (24, 16, 32, 40, 8):
        out = tmp_path / f"analysis{budget}"
        try:
            report = analyze.main(["--workdir", str(work), "--data", DATA, "--samples", "8",
                                   "--batch-size", "4", "--out", str(out), "--ilvas-n", "1",
                                   "--budget", str(budget), "--show", "1"])
            break
        except ValueError as e:
            assert "budget" in str(e) and (out / "report.json").is_file()
    else:
        pytest.fail("no budget gave a schedule")
    assert (out / "report.json").is_file() and (out / "schedule.json").is_file()
    assert report["model"]["n_vision"] == 64 and "error" not in report["proposal"]
    assert len(report["intra_modal"]["vision"]) == cfg.model.text.num_layers
    assert list((out / "stages").glob("*.png"))
    proposed = json.loads((out / "schedule.json").read_text())
    res = evaluate.main(["--workdir", str(work), "--schedule", str(out / "schedule.json")])
    assert res["schedule"]["inject_layer"] == proposed["inject_layer"]
    assert list(res["schedule"]["keep"]) == proposed["keep"]
    assert res["mean_vision_tokens"] == pytest.approx(proposed["mean_tokens"])


@pytest.mark.slow
def test_sharded_run_computes_the_same_loss(trained, data_dir, tmp_path):
    """Two simulated CPU devices, the batch split over `fsdp` and the weights sharded: the
    first steps' losses equal the one-device run's (same seed, same batches)."""
    cfg, work, _ = trained
    first = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    first = [m["loss"] for m in first if m["kind"] == "train"][:3]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "hidrop_jax.train", "--config", f"{CONFIG}:schedule=tok64",
         "--workdir", str(tmp_path / "sharded"), "--config.model.text.num_layers=4",
         f"--config.data.name={DATA}", f"--config.data.data_dir={data_dir}",
         "--config.train.steps=3", "--config.train.batch_size=4", "--config.train.lr=0.003",
         "--config.train.warmup_steps=1", "--config.train.log_every=1",
         "--config.train.eval_batches=1", "--config.train.async_ckpt=False",
         "--config.train.mesh=(1,2,1)"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines()]
    sharded = [m["loss"] for m in lines if m["kind"] == "train"]
    # the learning rate is 0 at step 1 (warmup from 0) and the peak at step 2 whatever the run's
    # length, so step 3's loss already follows one real update
    np.testing.assert_allclose(sharded, first, rtol=1e-4)


def test_llava_json_with_a_qwen_tokenizer_directory(tmp_path, data_dir):
    """llava_json records (non-square images, a text-only record) through `open_data` with a
    tokenizer directory, as a real Qwen run reads them: each image is resized to the config's
    grid and patchified (= `families.qwen2_5_vl.preprocess`), the batch runs, its loss is finite."""
    from PIL import Image
    from hidrop_jax.data.tokenizer import shapes_vqa_tokenizer
    from hidrop_jax.families import qwen2_5_vl as fam
    m = tmp_path / "manual"
    (m / "imgs").mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), (200, 10, 10), np.uint8)).save(m / "imgs/a.jpg")
    Image.fromarray(np.full((50, 30, 3), (10, 200, 10), np.uint8)).save(m / "imgs/b.png")
    H, G = "human", "gpt"
    recs = [{"id": "a", "image": "imgs/a.jpg", "conversations": [
                {"from": H, "value": "<image>\nwhat color is the square ?"}, {"from": G, "value": "red"}]},
            {"id": "b", "image": "imgs/b.png", "conversations": [
                {"from": H, "value": "what shape is the green object ?\n<image>"}, {"from": G, "value": "square"},
                {"from": H, "value": "is there a green square ?"}, {"from": G, "value": "yes"}]},
            {"id": "t", "conversations": [
                {"from": H, "value": "what color is the circle ?"}, {"from": G, "value": "blue"}]},
            {"id": "v", "image": "imgs/a.jpg", "conversations": [
                {"from": H, "value": "<image>\nhow many shapes are there ?"}, {"from": G, "value": "one"}]}]
    (m / "data.json").write_text(json.dumps(recs))
    tok_dir = tmp_path / "qwen_tok"
    shapes_vqa_tokenizer(str(tok_dir), family="qwen2_5_vl")
    cfg = _cfg(str(tmp_path / "tfds"))
    cfg.data.update(name="llava_json:json_file=data.json,num_validation=1", manual_dir=str(m),
                    tokenizer=str(tok_dir))
    tok, spec, train_src, _ = open_data(cfg, tmp_path / "w")
    batch = next(data_lib.eval_batches(train_src, tok, spec, batch_size=3))
    ids = [str(i) for i in batch["id"]]
    assert batch["has_image"].tolist() == [i != "t" for i in ids]
    a = ids.index("a")
    want = fam.preprocess(cfg.model, (m / "imgs/a.jpg").read_bytes())
    np.testing.assert_array_equal(batch["pixels"][a], want)
    assert not batch["pixels"][ids.index("t")].any() and not batch["vision_rope"][ids.index("t")].any()
    inputs, targets = to_inputs(batch)
    nll, n, _ = jax.jit(lambda p, x, t: token_nll(forward(cfg, p, x), t))(
        init_params(cfg, jax.random.PRNGKey(0)), inputs, targets)
    assert int(n) == sum(len(tok(a)["input_ids"]) + 1 for r in recs[:3]
                         for a in [c["value"] for c in r["conversations"] if c["from"] == G])
    assert np.isfinite(float(nll))


@pytest.mark.parametrize("config,template", [("tiny_shapes_qwen.py", "v1"), ("tiny_shapes.py", "qwen2")])
def test_a_template_of_another_family_is_refused(config, template):
    from hidrop_jax.config import validate_train
    cfg = load_config(str(ROOT / "configs" / config))
    cfg.data.template = template
    with pytest.raises(ValueError, match=f"data.template` = '{template}'"):
        validate_train(cfg)
