"""The LLaVA-1.5 recipe of `launch/README.md` §3-§7, run as the README writes it.

Every block marked `<!-- recipe: NAME -->` there is run here by bash, as real subprocesses,
with `$MODELS`, `$DATA` and `$RUNS` pointing at tiny stand-ins built offline: a Vicuna-like
`LlamaForCausalLM` with a fast BPE tokenizer, a CLIP (`CLIPModel`, as the hub's
clip-vit-large-patch14-336) and LLaVA-558K / LLaVA-665K-style JSON with image folders. The only
change to a documented command is that the overrides in `SHRINK` are appended to it (the last
occurrence of a flag wins; checked below). Each step's output is checked against something
the step did not compute: the import, the previous stage, the records written here, transformers.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hf_tiny import make_hf_llava

REPO = Path(__file__).resolve().parents[1]
README = REPO / "launch" / "README.md"

# The one place where the test departs from the README: appended to every command that runs
# the program named by the key (7B settings -> seconds on a CPU). Nothing else is changed.
SHRINK = {
    "-m hidrop_jax.train": ("--config.train.steps=2", "--config.train.batch_size=2",
                            "--config.train.warmup_steps=1", "--config.data.max_len=96",
                            "--config.train.eval_batches=1", "--config.train.log_every=1"),
    "-m hidrop_jax.generate": ("--max-new-tokens=4",),
}

# Tiny stand-ins: 8 LLM layers (tok64 scales to inject 2, cuts after 2/3, exit 6) and a CLIP
# of 56-px images in 14-px patches (16 vision tokens).
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=56, patch_size=14)
N_VISION = (VISION["image_size"] // VISION["patch_size"]) ** 2
N_VAL = 1000  # the README's num_validation; the JSON files hold more records than that

SPEC_558K = "llava_json:json_file=blip_laion_cc_sbu_558k.json,image_dir=pretrain_images,num_validation=1000"
SPEC_665K = "llava_json:json_file=llava_v1_5_mix665k.json,num_validation=1000"


# ----------------------------------------------------------------------------- the README

def recipe_blocks(text: str | None = None) -> dict:
    """{name: bash source} of the README's `<!-- recipe: NAME -->` fenced blocks, in order."""
    text = README.read_text() if text is None else text
    blocks = {}
    for name, body in re.findall(r"<!-- recipe: (\w+) -->\s*\n```bash\n(.*?)\n```", text, re.S):
        assert name not in blocks, f"two recipe blocks named {name!r} in {README}"
        blocks[name] = body
    return blocks


def shrink(source: str, extra=()) -> str:
    """Appends SHRINK's overrides (and `extra`) to the end of each command (continuation lines
    included) that runs one of its programs."""
    out, pending = [], None
    for line in source.splitlines():
        for prog, more in SHRINK.items():
            if re.search(re.escape(prog) + r"(\s|$)", line):
                pending = (*more, *extra)
        if pending is not None and not line.rstrip().endswith("\\"):
            line = line.rstrip() + " " + " ".join(shlex.quote(x) for x in pending)
            pending = None
        out.append(line)
    return "\n".join(out)


def run_block(name: str, env: dict, timings: dict, *, extra=(), label=None, check: bool = True,
              timeout: int = 900):
    """Runs block `name` (shrunk) in bash; `extra` is appended after SHRINK's overrides."""
    script = "set -euo pipefail\n" + shrink(recipe_blocks()[name], extra)
    t0 = time.time()
    p = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    timings[label or name] = time.time() - t0
    if check:
        assert p.returncode == 0, f"recipe block {name!r} failed:\n{script}\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return p


def test_readme_blocks_parse_and_shrink():
    blocks = recipe_blocks()
    assert list(blocks) == ["weights", "data", "stage1", "stage2", "evaluate", "export"]
    for name, body in blocks.items():
        assert "/shared" not in body and "python -c" not in body, name  # variables, no snippets
    s = shrink('X=(--a\n  --b)\npython -m hidrop_jax.train "${X[@]}" \\\n    --workdir w\necho done')
    assert s.splitlines()[3] == "    --workdir w " + " ".join(SHRINK["-m hidrop_jax.train"])
    assert s.splitlines()[4] == "echo done"


def test_readme_blocks_are_shellcheck_clean(tmp_path):
    """Users paste these blocks: quoted paths, arrays that survive spaces."""
    import shutil
    if shutil.which("shellcheck") is None:  # CI installs it (see tests/test_launch.py)
        pytest.skip("shellcheck is not installed")
    script = tmp_path / "recipe.sh"
    script.write_text("#!/usr/bin/env bash\n" + "\n".join(recipe_blocks().values()) + "\n")
    p = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_last_config_override_wins():
    """The shrink overrides rely on it: absl/ml_collections apply `--config.*` flags in order."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["prog", "--config", str(REPO / "configs" / "tiny_shapes.py"), "--config.train.steps=2177",
            "--config.data.template=plain", "--config.train.steps=2", "--config.data.template=v1"]
    fv = flags.FlagValues()  # as train.py defines it (the override flags come from argv)
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False, sys_argv=argv)
    fv(argv)
    assert fv.config.train.steps == 2 and fv.config.data.template == "v1"


# ----------------------------------------------------------------------------- tiny models

COLORS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("square", "circle", "bus", "cat", "tree", "car")


def caption(i: int) -> str:
    return f"a {COLORS[i % 6]} {SHAPES[(i // 6) % 6]} on a {COLORS[(i + 3) % 6]} background"


def corpus() -> list[str]:
    from hidrop_jax.data.templates import TEMPLATE_STRINGS
    words = [caption(i) for i in range(36)] + list(TEMPLATE_STRINGS) + [
        "Give a brief description of the image.", "Render a clear and concise summary of the photo.",
        "What are the colors of the bus in the image?", "The bus is white and red.",
        "What is the opposite of left? Right. Is there a cat? Yes, no. What color is it? "
        "How many objects are there? One, two. Describe the picture in detail.\n"]
    return words * 3


def make_tokenizer():
    """A fast BPE tokenizer with Llama's special tokens and its ▁ word marks (Metaspace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_vicuna(out: Path, *, with_tokenizer: bool = True, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = make_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
                                 **TEXT)).save_pretrained(out)
    if with_tokenizer:
        tok.save_pretrained(out)
    return tok


def make_clip(out: Path, *, seed: int = 0, **vision):
    """A `CLIPModel` directory (vision + text towers), as openai/clip-vit-large-patch14-336."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(
        vision_config={**VISION, **vision},
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        projection_dim=8)).save_pretrained(out)


# ----------------------------------------------------------------------------- tiny data

def image(path: Path, i: int, size=(40, 30)):
    from PIL import Image, ImageDraw
    rgb = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220),
           "yellow": (230, 220, 20), "white": (250, 250, 250), "black": (5, 5, 5)}
    im = Image.new("RGB", size, rgb[COLORS[(i + 3) % 6]])
    ImageDraw.Draw(im).rectangle([8, 6, 28, 22], fill=rgb[COLORS[i % 6]])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def turn(h: str, g: str) -> list:
    return [{"from": "human", "value": h}, {"from": "gpt", "value": g}]


def write_data(root: Path) -> dict:
    """$DATA/llava as §4 lays it out; returns what the builds must find."""
    m = root / "llava"
    pool = 12
    for i in range(pool):  # 558K: pretrain_images/00000/..., reused across records
        image(m / "pretrain_images" / "00000" / f"{i:09d}.jpg", i)
        image(m / "coco" / "train2017" / f"{i:012d}.jpg", i, size=(30, 44))
    image(m / "coco" / "train2017" / "000000033471.jpg", 14)  # the README's generate image
    (m / "pretrain_images" / "00000" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
    (m / "coco" / "train2017" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
    image(root / "outside.jpg", 0)  # a valid image outside manual_dir: must never be read

    prompts = ("<image>\nGive a brief description of the image.",
               "Render a clear and concise summary of the photo.\n<image>")
    # 558K: the interesting records come first (train split); the last 1000 are validation
    s1 = [{"id": "missing", "image": "00000/nope.jpg", "conversations": turn(prompts[0], caption(0))},
          {"id": "corrupt", "image": "00000/corrupt.jpg", "conversations": turn(prompts[0], caption(1))}]
    s1 += [{"id": f"{i:09d}", "image": f"00000/{i % pool:09d}.jpg",
            "conversations": turn(prompts[i % 2], caption(i % pool))} for i in range(N_VAL + 8)]
    (m / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(s1))

    def coco(i):
        return f"coco/train2017/{i % pool:012d}.jpg"

    def qa(i):
        c = COLORS[(i % pool) % 6]
        return ("What color is it?", f"It is {c}.")

    s2 = [
        {"id": "multi_round", "image": coco(0), "conversations":
            turn("<image>\nWhat color is it?", "It is red.") + turn("Is there a cat?", "no")
            + turn("Describe the picture in detail.", caption(0))},
        {"id": "mid_text", "image": coco(1), "conversations":
            turn("Describe the picture\n<image>\nin detail.", caption(1)) + turn("Is there a cat?", "no")},
        {"id": "text_only", "conversations": turn("What is the opposite of left?", "Right.")},
        {"id": "missing", "image": "coco/train2017/nope.jpg", "conversations": turn(*qa(0))},
        {"id": "corrupt", "image": "coco/train2017/corrupt.jpg", "conversations": turn(*qa(0))},
        {"id": "two_tags", "image": coco(2), "conversations":
            turn("<image>\nWhat color is it?", "It is blue.") + turn("<image>\nIs there a cat?", "no")},
        {"id": "escape", "image": "../../etc/passwd", "conversations": turn(*qa(0))},
        {"id": "escape_real", "image": "../outside.jpg", "conversations": turn(*qa(0))},
        {"id": "absolute", "image": str(root / "outside.jpg"), "conversations": turn(*qa(0))},
    ]
    s2 += [{"id": f"{i:012d}", "image": coco(i), "conversations":
            turn("<image>\n" + qa(i)[0], qa(i)[1]) + turn("Is there a cat?", "no")} for i in range(4)]
    s2.append({"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations":
               turn("What are the colors of the bus in the image?\n<image>", "The bus is white and red.")})
    val = []
    for i in range(N_VAL):
        if i % 10 == 9:
            val.append({"id": f"val_text_{i}", "conversations": turn("What is the opposite of left?", "Right.")})
        else:
            val.append({"id": f"val_{i}", "image": coco(i), "conversations":
                        turn("<image>\n" + qa(i)[0], qa(i)[1]) + turn("How many objects are there?", "One.")})
    s2 += val
    (m / "llava_v1_5_mix665k.json").write_text(json.dumps(s2))
    return dict(
        s1_train=len(s1) - N_VAL - 2, s1_skipped={"missing_image": ["missing"], "corrupt_image": ["corrupt"]},
        s2_train=len(s2) - N_VAL - 6,
        s2_skipped={"missing_image": ["missing"], "corrupt_image": ["corrupt"], "image_tags": ["two_tags"],
                    "unsafe_path": ["escape", "escape_real", "absolute"]},
        s2_val_rounds=sum(len(r["conversations"]) // 2 for r in val))


# ----------------------------------------------------------------------------- the journey

def _env(root: Path) -> dict:
    env = dict(os.environ, MODELS=str(root / "models"), DATA=str(root / "data"),
               RUNS=str(root / "runs"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TF_CPP_MIN_LOG_LEVEL="2")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def _max_diff(a: dict, b: dict, part: str) -> float:
    fa, fb = _flat(a[part]), _flat(b[part])
    assert fa.keys() == fb.keys()
    return max(float(np.abs(fa[k] - fb[k]).max()) for k in fa)


@pytest.mark.slow
def test_recipe(tmp_path):
    from hidrop_jax.checkpoint import load_checkpoint, load_run
    from hidrop_jax.config import schedule_of
    from hidrop_jax.convert import load_hf
    from hidrop_jax.data.sources import load_source, make_builder

    env, timings = _env(tmp_path), {}
    models, data, runs = (Path(env[k]) for k in ("MODELS", "DATA", "RUNS"))
    t0 = time.time()
    tok = make_vicuna(models / "vicuna-7b-v1.5")
    make_clip(models / "clip-vit-large-patch14-336")
    want = write_data(data)
    timings["setup"] = time.time() - t0

    # §3: assemble + import
    run_block("weights", env, timings)
    imp_dir = models / "llava15-7b-init"
    cfg0, p0 = load_checkpoint(imp_dir)
    assert cfg0.model.text.num_layers == TEXT["num_hidden_layers"]
    assert cfg0.model.image_token_id == len(tok) and cfg0.model.text.vocab_size % 64 == 0
    assert cfg0.model.vision.image_size == VISION["image_size"]

    # §4: datasets; the skipped records are counted and named
    p = run_block("data", env, timings)
    assert p.stdout.count("skipped") == 2, p.stdout
    for spec, n_train, skipped in ((SPEC_558K, want["s1_train"], want["s1_skipped"]),
                                   (SPEC_665K, want["s2_train"], want["s2_skipped"])):
        info = make_builder(spec, str(data / "tfds")).info
        assert {k: v for k, v in info.metadata["skipped"].items() if v} == {k: len(v) for k, v in skipped.items()}
        assert {k: v for k, v in info.metadata["skipped_ids"].items() if v} == skipped
        assert (info.splits["train"].num_examples, info.splits["validation"].num_examples) == (n_train, N_VAL)
    recs = load_source(SPEC_665K, "train", str(data / "tfds"), build=False)
    recs = {r["id"].decode(): r for r in (recs[i] for i in range(len(recs)))}
    q = lambda r: [x.decode() for x in r["conversations"]["question"]]  # noqa: E731
    assert q(recs["mid_text"]) == ["Describe the picture\nin detail.", "Is there a cat?"]
    assert len(q(recs["multi_round"])) == 3 and recs["multi_round"]["has_image"]
    assert not recs["text_only"]["has_image"]

    # §6 stage 1: only the projector moves
    run_block("stage1", env, timings)
    cfg1, p1, step1 = load_run(runs / "s1")
    assert step1 == 2 and cfg1.train.steps == 2 and cfg1.train.trainable == "projector"  # SHRINK won
    assert cfg1.data.template == "plain" and cfg1.model.text.num_layers == TEXT["num_hidden_layers"]
    assert cfg1.hidrop.name == "tok64" and len(schedule_of(cfg1).prune_after) > 0
    for part in ("vision", "text"):
        assert _max_diff(p1, p0, part) == 0.0, part
    moved1 = _max_diff(p1, p0, "projector")
    assert moved1 > 5e-4  # Adam moves each weight by ~lr = 1e-3 at step 2 (lr 0 at step 1)
    metrics = [json.loads(x) for x in (runs / "s1" / "metrics.jsonl").read_text().splitlines()]
    train_m = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train_m] == [1, 2] and all(np.isfinite(m["loss"]) for m in train_m)
    assert "skipped" in train_m[-1] and any(m["kind"] == "eval" for m in metrics)

    # §6 stage 2: starts from stage 1's weights exactly
    run_block("stage2", env, timings)
    cfg2, p2, step2 = load_run(runs / "s2")
    assert step2 == 2 and cfg2.train.trainable == "projector+llm" and cfg2.data.template == "v1"
    assert _max_diff(p2, p1, "vision") == 0.0  # frozen: stage 1's tower, bit for bit
    assert _max_diff(p2, p1, "text") > 0.0
    # Stage 2's two steps (lr 0, then 2e-5) move a weight by at most ~2e-5 (Adam's step is
    # ~lr): its projector is stage 1's, not the import's (which is `moved1` away).
    assert _max_diff(p2, p1, "projector") <= 4e-5 < moved1 / 10

    # init_from of another architecture: the stage-2 command stops, naming the fields
    other = tmp_path / "other-llava-hf"
    make_hf_llava(other)
    p = run_block("stage2", env, timings, check=False, label="stage2 (init_from: another architecture)",
                  extra=("--workdir", str(runs / "bad"), f"--config.train.init_from={other}"))
    assert p.returncode == 2 and not (runs / "bad").exists()  # refused before anything is written
    assert re.search(r"train.init_from=.*other-llava-hf.* has another architecture .*"
                     r"model\.text\.num_layers: 4 != 8", p.stderr), p.stderr[-3000:]

    # §7 evaluate + generate
    p = run_block("evaluate", env, timings)
    res = json.loads((runs / "s2" / "eval_validation.json").read_text())
    assert res["step"] == 2 and res["rounds"] == want["s2_val_rounds"], res["rounds"]
    assert 0.0 <= res["accuracy"] <= 1.0 and res["mean_vision_tokens"] < N_VISION
    assert re.search(r"step 2 validation: accuracy [\d.]+ over %d answers" % want["s2_val_rounds"], p.stdout)
    assert re.search(r"\[\d+ tokens generated: \[[\d, ]*\]; schedule tok64", p.stdout), p.stdout
    assert "cut after layer" in p.stdout

    # §7 export: loads in transformers, whose logits equal ours (vanilla) on the exported dir
    run_block("export", env, timings)
    out = runs / "hidrop-llava15-7b-hf"
    cfg_e, p_e = load_hf(out)
    for part in ("vision", "projector", "text"):
        assert _max_diff(p_e, p2, part) == 0.0, part
    _check_hf_logits(out, cfg_e, p_e)

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("\nrecipe wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + f"; total {time.time() - t0:.1f} (subprocesses' CPU: user {cpu.ru_utime:.1f}, "
          f"system {cpu.ru_stime:.1f})")


def _check_hf_logits(out: Path, cfg, params):
    import torch
    from transformers import LlavaForConditionalGeneration

    from hidrop_jax.model import forward_hf, hf_to_inputs
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert cfg.hidrop.name == "vanilla"
    rng = np.random.default_rng(0)
    img, n = cfg.model.image_token_id, N_VISION
    rows = [[1, *rng.integers(3, img, 2), *[img] * n, *rng.integers(3, img, 9)],
            [1, *rng.integers(3, img, 10)] + [0] * (n + 1)]       # text only, right-padded
    ids = np.asarray(rows, np.int64)
    mask = (np.arange(ids.shape[1]) < np.asarray([[len(rows[0])], [11]])).astype(np.int64)
    px = rng.normal(size=(1, 3, VISION["image_size"], VISION["image_size"])).astype(np.float32)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(px)).logits.numpy()
    got = np.asarray(forward_hf(cfg, params, ids, px, mask))
    inputs, slots = hf_to_inputs(cfg.model, ids, px, mask)  # where each of ours sits in `ids`
    valid = np.asarray(inputs.text_valid)
    assert valid.sum() == 12 + 11
    want = np.take_along_axis(want, slots[..., None], 1)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- bad input

def _assemble():
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import assemble_llava
    finally:
        sys.path.remove(str(REPO / "launch"))
    return assemble_llava


def test_assemble_names_a_vicuna_without_tokenizer(tmp_path):
    make_vicuna(tmp_path / "vicuna", with_tokenizer=False)
    make_clip(tmp_path / "clip")
    args = ["--llm", str(tmp_path / "vicuna"), "--vision", str(tmp_path / "clip"), "--out", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match=r"--llm .*vicuna holds no tokenizer .*--tokenizer DIR"):
        _assemble().main(args)
    assert not (tmp_path / "out").exists()
    make_tokenizer().save_pretrained(tmp_path / "tok")  # the way out the message names
    _assemble().main(args + ["--tokenizer", str(tmp_path / "tok")])
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_clip_of_another_image_size_is_named(tmp_path):
    """`train.init_vision` (LLaVA's --vision_tower) checks the tower against the model config."""
    from hidrop_jax.convert import load_hf
    from hidrop_jax.hf.load import load_hf_vision
    from hidrop_jax.model import abstract_params
    make_vicuna(tmp_path / "vicuna")
    make_clip(tmp_path / "clip")
    make_clip(tmp_path / "clip84", image_size=84)
    _assemble().main(["--llm", str(tmp_path / "vicuna"), "--vision", str(tmp_path / "clip"),
                      "--out", str(tmp_path / "llava")])
    cfg, _ = load_hf(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"clip84 is not this model's vision tower: its image_size = 84 \(config: 56\)"):
        load_hf_vision(cfg, tmp_path / "clip84")
    tower = load_hf_vision(cfg, tmp_path / "clip")  # the right one loads
    assert _flat(tower).keys() == _flat(abstract_params(cfg)["vision"]).keys()


def test_llava_json_refuses_paths_out_of_manual_dir_and_two_image_tags(tmp_path, monkeypatch):
    """Counted skips naming the record; an escaping path is never opened (a spy on the image
    reader), even where it names a readable image."""
    from hidrop_jax.data import llava_json
    from hidrop_jax.data.sources import load_source, make_builder
    m = tmp_path / "manual"
    image(m / "ok.jpg", 0)
    image(tmp_path / "outside.jpg", 1)
    q = turn("<image>\nWhat color is it?", "It is red.")
    recs = [{"id": "ok", "image": "ok.jpg", "conversations": q},
            {"id": "climb", "image": "../outside.jpg", "conversations": q},
            {"id": "passwd", "image": "../../etc/passwd", "conversations": q},
            {"id": "abs", "image": str(tmp_path / "outside.jpg"), "conversations": q},
            {"id": "inner_dots", "image": "sub/../ok.jpg", "conversations": q},  # stays inside: fine
            {"id": "two_tags", "image": "ok.jpg", "conversations": q + turn("<image>\nAnd now?", "Blue.")}]
    (m / "data.json").write_text(json.dumps(recs))
    opened = []
    real = llava_json.load_image_bytes
    monkeypatch.setattr(llava_json, "load_image_bytes", lambda p: opened.append(p) or real(p))
    spec, d = "llava_json:json_file=data.json", str(tmp_path / "tfds")
    src = load_source(spec, "train", d, manual_dir=str(m))
    assert sorted(src[i]["id"].decode() for i in range(len(src))) == ["inner_dots", "ok"]
    meta = make_builder(spec, d).info.metadata
    assert {k: v for k, v in meta["skipped_ids"].items() if v} == {
        "unsafe_path": ["climb", "passwd", "abs"], "image_tags": ["two_tags"]}
    assert meta["skipped"]["unsafe_path"] == 3 and meta["skipped"]["image_tags"] == 1
    root = str(m) + os.sep
    assert len(opened) == 2 and all(os.path.abspath(p).startswith(root) for p in opened), opened
