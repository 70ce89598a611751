"""HiDrop in PyTorch for Qwen2.5-VL: the exported modeling file (trust_remote_code) against JAX.

Tiny random HF Qwen2.5-VL (6 layers, GQA, a 16×24 px image = 24 vision tokens over 6 ViT
windows) -> `load_hf` -> a schedule -> `save_hf` -> `AutoModelForImageTextToText.from_pretrained(
..., trust_remote_code=True)`: logits and kept tokens equal JAX's `forward` (independent code:
Flax layers, static-shape stages, the vision block at the end of memory, NumPy M-RoPE positions),
greedy generation equals `generate_hf`, and vanilla equals transformers' own model.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest
import torch

from hf_tiny_qwen import IMAGE_TOKEN, make_batch, make_hf_qwen
from isolated_import import check_imports, run_isolated
from hidrop_jax.config import schedule_of, with_schedule
from hidrop_jax.convert import load_hf, save_hf
from hidrop_jax.generate import generate_hf
from hidrop_jax.hf import remote_code
from hidrop_jax.hf.inputs import qwen_hf_to_inputs
from hidrop_jax.model import forward

LAYERS, N_VIS, GRID_PX = 6, 24, (16, 24)
# (preset, fields on top): the presets rescaled to 6 layers / 24 tokens, and one in fractions
SCHEDULES = {
    "vanilla": ("vanilla", {}),
    "pdrop": ("pdrop", {}),
    "tok64": ("tok64", {}),
    "fractions": ("vanilla", dict(inject_layer=1, prune_after=(1, 3), keep=(0.4, 0.15), exit_layer=5)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, cfg, params, export of the `fractions` schedule loaded with remote code).
    initializer_range 0.2 makes attention peaked, so the kept sets are decided by clear margins."""
    from transformers import AutoModelForImageTextToText
    d = tmp_path_factory.mktemp("qwen_hf")
    hf = make_hf_qwen(d, text=dict(num_hidden_layers=LAYERS, initializer_range=0.2), tie=False, seed=3)
    cfg, params = load_hf(d, image_size=GRID_PX)
    c = _with(cfg, "fractions")
    out = save_hf(c, params, tmp_path_factory.mktemp("qwen_out") / "m")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    return hf, cfg, params, out, model


def _with(cfg, name):
    c = ml_collections.ConfigDict(cfg.to_dict())
    preset, fields = SCHEDULES[name]
    return with_schedule(c, preset, **fields)


def _batch(padding, seed=7):
    """Ragged: images at different offsets, one sample without an image; mm_token_type_ids passed."""
    return make_batch([5, 4, 9], [2, None, 0], padding=padding, seed=seed)


def _torch_logits(model, batch, **kw):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}, **kw).logits.numpy()


def _jax(c, params, batch):
    """(logits [B, T, V], kept per cut, text slots [B, T], valid [B, T], has_image [B])."""
    inputs, slots, m = qwen_hf_to_inputs(c.model, batch["input_ids"], batch["pixel_values"],
                                         batch["attention_mask"], image_grid_thw=batch["image_grid_thw"],
                                         mm_token_type_ids=batch["mm_token_type_ids"])
    logits, aux = jax.jit(lambda p, x: forward(c, p, x, return_aux=True))(params, inputs)
    return (np.asarray(logits), [np.asarray(k) for k in aux["kept"]], slots,
            np.asarray(inputs.text_valid), np.asarray(inputs.has_image))


FAST = {("fractions", "left"), ("tok64", "right")}  # the rest: @slow (each is a JAX compile)


@pytest.mark.parametrize("name,padding", [
    pytest.param(n, p, marks=() if (n, p) in FAST else pytest.mark.slow)
    for n in SCHEDULES for p in ("left", "right")])
def test_logits_and_kept_tokens_match_jax(tiny, name, padding):
    _, cfg, params, _, model = tiny
    c = _with(cfg, name)
    trained = model.config.hidrop
    try:
        model.set_hidrop_schedule(remote_code.hidrop_fields(c))  # what an export of `c` carries
        batch = _batch(padding)
        got = _torch_logits(model, batch)
        kept = model.hidrop_kept if model.hidrop_schedule is not None else []
    finally:
        model.set_hidrop_schedule(trained)
    want, want_kept, slots, valid, has = _jax(c, params, batch)
    got = np.take_along_axis(got, slots[..., None], axis=1)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    assert len(kept) == len(schedule_of(c).prune_after) == len(want_kept)
    for k_torch, k_jax in zip(kept, want_kept):  # the same vision tokens survive every cut
        np.testing.assert_array_equal(k_torch.numpy()[has], k_jax[has])
        assert (k_torch.numpy()[~has] == -1).all()


@pytest.mark.parametrize("name", ["fractions", pytest.param("pdrop", marks=pytest.mark.slow)])
def test_greedy_generate_matches_jax(tiny, name):
    _, cfg, params, _, model = tiny
    c = _with(cfg, name)
    batch = _batch("left", seed=9)
    n_new = 4
    ours = generate_hf(c, params, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                       image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=batch["mm_token_type_ids"], max_new_tokens=n_new)
    trained = model.config.hidrop
    try:
        model.set_hidrop_schedule(remote_code.hidrop_fields(c))
        with torch.no_grad():
            gen = model.generate(**{k: torch.tensor(v) for k, v in batch.items()},
                                 max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True)
        theirs = gen.sequences
        kept = model.hidrop_kept
        # a hand-written loop without position_ids: HF's rope_deltas rotate the new tokens
        step = {k: torch.tensor(v) for k, v in batch.items()}
        with torch.no_grad():
            out = model(**step, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([step["attention_mask"], torch.ones_like(nxt)], 1)
            out2 = model(input_ids=nxt, attention_mask=mask, cache=out.cache)
        np.testing.assert_array_equal(nxt[:, 0], theirs[:, batch["input_ids"].shape[1]])
        np.testing.assert_allclose(out2.logits[:, -1], gen.logits[1], atol=1e-5, rtol=0)
        # each layer's cache holds the keys that layer kept: the longest row's text + its vision
        want = schedule_of(c).tokens_per_layer()
        assert model.vision_tokens_per_layer(N_VIS) == want
        two = {k: v[:2] if k != "pixel_values" else v[:N_VIS * 4] for k, v in _batch("left", seed=4).items()}
        two["image_grid_thw"] = two["image_grid_thw"][:1]  # sample 0 has the one image of the two
        with torch.no_grad():
            cache = model(**{k: torch.tensor(v) for k, v in two.items()}, use_cache=True).cache
    finally:
        model.set_hidrop_schedule(trained)
    L = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(theirs[:, L:].numpy(), np.asarray(ours["tokens"]))
    has = (batch["input_ids"] == IMAGE_TOKEN).any(1)
    for k_torch, k_jax in zip(kept, ours["kept"]):  # pruned once, at prefill
        np.testing.assert_array_equal(k_torch.numpy()[has], np.asarray(k_jax)[has])
    n_text = int(two["attention_mask"][0].sum()) - N_VIS  # the longer row is sample 0's
    assert [cache.layers[i].keys.shape[2] for i in range(LAYERS)] == [n_text + n for n in want]


def test_export_loads_vanilla_plain_and_schedule_switches(tiny, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf, cfg, params, out, model = tiny
    assert type(model).__name__ == "HiDropQwen2_5_VLForConditionalGeneration"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "hidrop_schedule.json", "hidrop_torch.py", "model.safetensors",
                     "modeling_hidrop_qwen2_5_vl.py"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "qwen2_5_vl" and conf["auto_map"] == remote_code.auto_map("qwen2_5_vl")
    assert conf["hidrop"]["keep"] == [0.4, 0.15]  # fractions travel as fractions
    # plain transformers loads the same directory as vanilla: HF's own model (here with its
    # default attention kernel, the reference eager: so 1e-4)
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    batch = _batch("right")
    ref = _torch_logits(plain, batch)
    np.testing.assert_allclose(ref, _torch_logits(hf, batch), atol=1e-4, rtol=0)
    trained = model.config.hidrop
    try:
        model.set_hidrop_schedule("vanilla")
        assert model.hidrop_schedule is None and model.vision_tokens_per_layer(N_VIS) == [N_VIS] * LAYERS
        np.testing.assert_allclose(_torch_logits(model, batch), ref, atol=1e-6, rtol=0)
        model.set_hidrop_schedule(trained, keep=[12, 3])
        _torch_logits(model, batch)
        assert [k.shape[1] for k in model.hidrop_kept] == [12, 3]
        for bad, msg in [(dict(keep=[0.4, 1.5]), r"hidrop.keep\[1\] = 1.5 is invalid; allowed: an int count, or a float fraction"),
                         (dict(keep=[12, 12]), r"hidrop.keep\[1\] = 12 is invalid; allowed: less than keep\[0\] = 12"),
                         (dict(exit_layer=7), r"hidrop.exit_layer = 7 is invalid; allowed: None or an int in \[2, 6\]"),
                         (dict(positions="group"), r"hidrop.positions = 'group' is invalid; allowed: 'persistent'")]:
            with pytest.raises(ValueError, match=msg):
                model.set_hidrop_schedule(trained, **bad)
        # a count that does not fit this image's tokens fails when it runs, naming the sample
        model.set_hidrop_schedule(trained, keep=[30, 3])
        with pytest.raises(ValueError, match=r"sample 0 \(24 vision tokens\): hidrop.keep\[0\] = 30"):
            _torch_logits(model, batch)
    finally:
        model.set_hidrop_schedule(trained)
    with pytest.raises(ValueError, match="num_beams = 2 is not supported"):
        model.generate(**{k: torch.tensor(v) for k, v in batch.items()}, num_beams=2, max_new_tokens=2)
    # a vanilla Qwen export stays plain; the flag leaves the code out
    for d in (save_hf(_with(cfg, "vanilla"), params, tmp_path / "vanilla"),
              save_hf(_with(cfg, "tok64"), params, tmp_path / "bare", hidrop_code=False)):
        assert not (d / "modeling_hidrop_qwen2_5_vl.py").exists() and not (d / "hidrop_torch.py").exists()
        assert "auto_map" not in json.loads((d / "config.json").read_text())


def test_modeling_files_import_with_torch_and_transformers_only(tmp_path):
    """Statically: every import is of torch, transformers or the shared `hidrop_torch`. In a
    subprocess where `hidrop_jax` cannot be found, the two files import and a tiny model
    generates (mm_token_type_ids left out: derived from input_ids)."""
    files = [remote_code.modeling_file("qwen2_5_vl"), remote_code.HELPER_FILE]
    check_imports(files)
    run_isolated(tmp_path, files, "modeling_hidrop_qwen2_5_vl", """
cfg = m.HiDropQwen2_5_VLConfig(
    text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                     rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[1, 1, 2])),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                       patch_size=2, spatial_merge_size=2, window_size=4, fullatt_block_indexes=[0]),
    image_token_id=39, video_token_id=38, vision_start_token_id=36, vision_end_token_id=37,
    hidrop=dict(inject_layer=1, prune_after=[1], keep=[0.5], exit_layer=3))
model = m.HiDropQwen2_5_VLForConditionalGeneration(cfg).eval()
ids = torch.tensor([[3, 4, 36] + [39] * 4 + [37, 5]])
out = model.generate(input_ids=ids, pixel_values=torch.randn(16, 3 * 2 * 2 * 2),
                     image_grid_thw=torch.tensor([[1, 4, 4]]), max_new_tokens=2, min_new_tokens=2,
                     pad_token_id=0)  # random weights may say EOS (id 2) first
assert out.shape == (1, 11) and [k.shape for k in model.hidrop_kept] == [(1, 2)], out.shape
""")


def test_export_carries_tokenizer_and_image_processor(tiny, tmp_path):
    """With a tokenizer, the Qwen export holds it and an image processor for the config's grid:
    transformers' processor turns an image of that size into our own `preprocess` patches."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast
    from hidrop_jax.families import qwen2_5_vl as family
    _, cfg, params, _, _ = tiny
    vocab = {f"w{i}": i for i in range(128)}
    del vocab[f"w{IMAGE_TOKEN}"]
    vocab["<|image_pad|>"] = IMAGE_TOKEN
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w3", pad_token="w0")
    tok.add_special_tokens({"additional_special_tokens": ["<|image_pad|>"]})
    out = save_hf(_with(cfg, "tok64"), params, tmp_path / "m", tokenizer=tok)
    text = "w5 w7 <|image_pad|><|image_pad|> w9"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok(text)["input_ids"] == [5, 7, 120, 120, 9]
    img = np.random.default_rng(0).integers(0, 256, size=(*GRID_PX, 3), dtype=np.uint8)
    got = AutoImageProcessor.from_pretrained(out)(images=img, return_tensors="np")
    assert got["image_grid_thw"].tolist() == [[1, GRID_PX[0] // 2, GRID_PX[1] // 2]]
    np.testing.assert_allclose(got["pixel_values"], family.preprocess(cfg.model, img), atol=1e-5, rtol=0)
