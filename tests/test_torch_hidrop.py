"""HiDrop in PyTorch: the exported modeling file (trust_remote_code) against our JAX model.

Tiny random HF LLaVA (8 layers, GQA, 16 vision tokens) -> `load_hf` -> a schedule -> `save_hf` ->
`AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)`: logits, kept tokens
and greedy generation equal JAX's `forward_hf` / `forward(return_aux=True)` / `generate_hf`
(independent code: Flax layers, static-shape stages, the vision block at the end of memory).
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from hf_tiny import make_batch, make_hf_llava
from isolated_import import check_imports, run_isolated
from hidrop_jax import generate as gen_lib
from hidrop_jax.batch import to_inputs
from hidrop_jax.checkpoint import save_checkpoint
from hidrop_jax.config import schedule_of, with_schedule
from hidrop_jax.convert import load_hf, main as convert_main, save_hf
from hidrop_jax.hf import remote_code
from hidrop_jax.hf.inputs import expand_image_tokens, hf_to_inputs
from hidrop_jax.hf.torch_eval import evaluate_torch
from hidrop_jax.hidrop.schedule import PRESETS, preset
from hidrop_jax.model import forward, forward_hf

LAYERS, N_VIS, MAX_NEW = 8, 16, 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF dir, cfg, params). initializer_range 0.2 makes attention peaked, so the kept sets are
    decided by clear margins, not by float rounding between the two implementations."""
    d = tmp_path_factory.mktemp("hf")
    make_hf_llava(d, text=dict(num_hidden_layers=LAYERS, num_key_value_heads=2,
                               initializer_range=0.2), seed=1)
    cfg, params = load_hf(d)
    return d, cfg, jax.tree.map(jnp.asarray, params)


_EXPORTS = {}


def _with(cfg, name, **overrides):
    c = ml_collections.ConfigDict(cfg.to_dict())
    with_schedule(c, name, **overrides)
    return c


def _export(tiny, tmp_path_factory, name):
    """(cfg under preset `name`, the export loaded with trust_remote_code), once per preset."""
    from transformers import AutoModelForImageTextToText
    if name not in _EXPORTS:
        _, cfg, params = tiny
        c = _with(cfg, name)
        out = save_hf(c, jax.device_get(params), tmp_path_factory.mktemp(f"out_{name}") / "m")
        model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
        _EXPORTS[name] = (c, out, model)
    return _EXPORTS[name]


def _batch(model, padding, seed=3):
    """Ragged: two images at different offsets, one sample without an image."""
    ids, mask, _, px = make_batch(model, [5, 9, 7], [True, True, False], padding=padding, seed=seed)
    return ids, mask, px


def _torch_logits(model, ids, mask, px, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(px), **kw).logits.numpy()


FAST = {("tok64", "left"), ("pdrop", "right")}  # the rest: @slow (each preset is a JAX compile)


@pytest.mark.parametrize("name,padding", [
    pytest.param(n, p, marks=() if (n, p) in FAST else pytest.mark.slow)
    for n in PRESETS for p in ("left", "right")])
def test_logits_and_kept_tokens_match_jax(tiny, tmp_path_factory, name, padding):
    _, _, params = tiny
    c, _, model = _export(tiny, tmp_path_factory, name)
    assert type(model).__name__ == ("LlavaForConditionalGeneration" if name == "vanilla"
                                    else "HiDropLlavaForConditionalGeneration")
    ids, mask, px = _batch(model, padding)
    got = _torch_logits(model, ids, mask, px)
    inputs, slots = hf_to_inputs(c.model, ids, px, mask)
    want, aux = jax.jit(lambda p, x: forward(c, p, x, return_aux=True))(params, inputs)
    valid = np.asarray(inputs.text_valid)
    got = np.take_along_axis(got, slots[..., None], axis=1)
    np.testing.assert_allclose(got[valid], np.asarray(want)[valid], atol=1e-4, rtol=0)
    # the same vision tokens survive every cut (samples with an image; the third has none)
    has = np.asarray(inputs.has_image)
    kept = [] if name == "vanilla" else model.hidrop_kept
    assert len(kept) == len(schedule_of(c).prune_after) == len(aux["kept"])
    for k_torch, k_jax in zip(kept, aux["kept"]):
        np.testing.assert_array_equal(k_torch.numpy()[has], np.asarray(k_jax)[has])
        assert (k_torch.numpy()[~has] == -1).all()


@pytest.mark.parametrize("name", ["tok64", pytest.param("pdrop", marks=pytest.mark.slow),
                                  pytest.param("mobilellama", marks=pytest.mark.slow)])
def test_greedy_generate_matches_jax(tiny, tmp_path_factory, name):
    _, _, params = tiny
    c, _, model = _export(tiny, tmp_path_factory, name)
    ids, mask, px = _batch(model, "left", seed=5)
    ours = gen_lib.generate_hf(c, params, ids, px, mask, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                pixel_values=torch.tensor(px), max_new_tokens=MAX_NEW,
                                do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(theirs[:, ids.shape[1]:].numpy(), np.asarray(ours["tokens"]))
    has = np.asarray(hf_to_inputs(c.model, ids, px, mask)[0].has_image)
    for k_torch, k_jax in zip(model.hidrop_kept, ours["kept"]):  # pruned once, at prefill
        np.testing.assert_array_equal(k_torch.numpy()[has], np.asarray(k_jax)[has])
    # each layer's cache holds the keys that layer kept: the longest row's text + its vision tokens
    want = preset(name, LAYERS, N_VIS).tokens_per_layer()
    assert model.vision_tokens_per_layer() == want
    with torch.no_grad():  # the two samples with an image
        cache = model(input_ids=torch.tensor(ids[:2]), attention_mask=torch.tensor(mask[:2]),
                      pixel_values=torch.tensor(px[:2]), use_cache=True).cache
    n_text = int(mask[:2].sum(1).max()) - N_VIS
    assert [cache.layers[i].keys.shape[2] for i in range(LAYERS)] == [n_text + n for n in want]


def test_export_layout_and_flag(tiny, tmp_path_factory, tmp_path):
    _, cfg, params = tiny
    c, out, _ = _export(tiny, tmp_path_factory, "tok64")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "hidrop_schedule.json", "hidrop_torch.py", "model.safetensors",
                     "modeling_hidrop_llava.py"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "llava" and conf["auto_map"] == remote_code.AUTO_MAP
    assert {k: conf["hidrop"][k] for k in ("inject_layer", "prune_after", "keep", "exit_layer")} == dict(
        inject_layer=2, prune_after=[2, 3], keep=[6, 1], exit_layer=6)
    for f in (remote_code.MODELING_FILE, remote_code.HELPER_FILE):
        assert (out / f.name).read_bytes() == f.read_bytes()
    # the flag leaves the code out; a vanilla schedule never writes it
    bare = save_hf(c, jax.device_get(params), tmp_path / "bare", hidrop_code=False)
    vanilla = save_hf(_with(cfg, "vanilla"), jax.device_get(params), tmp_path / "vanilla")
    for d in (bare, vanilla):
        assert not (d / "modeling_hidrop_llava.py").exists() and not (d / "hidrop_torch.py").exists()
        assert "auto_map" not in json.loads((d / "config.json").read_text())
    # CLI: export-hf writes it by default, --no-hidrop-code leaves it out
    save_checkpoint(tmp_path / "ckpt", c, jax.device_get(params))
    convert_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "cli")])
    convert_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "cli_bare"), "--no-hidrop-code"])
    assert (tmp_path / "cli" / "modeling_hidrop_llava.py").exists()
    assert not (tmp_path / "cli_bare" / "modeling_hidrop_llava.py").exists()
    with pytest.raises(ValueError, match=r"hidrop.positions = 'group'.*--no-hidrop-code"):
        save_hf(_with(cfg, "tok64", positions="group"), jax.device_get(params), tmp_path / "group")


def test_plain_llava_loads_vanilla_and_schedule_switches(tiny, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration
    _, cfg, params = tiny
    c, out, model = _export(tiny, tmp_path_factory, "tok48")
    plain = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, mask, px = _batch(model, "right")
    inputs, slots = hf_to_inputs(c.model, ids, px, mask)
    valid = np.asarray(inputs.text_valid)
    jax_vanilla = np.asarray(forward_hf(_with(cfg, "vanilla"), params, ids, px, mask))[valid]
    pick = lambda lg: np.take_along_axis(lg, slots[..., None], axis=1)[valid]
    np.testing.assert_allclose(pick(_torch_logits(plain, ids, mask, px)), jax_vanilla, atol=1e-4, rtol=0)
    trained = model.config.hidrop
    try:
        model.set_hidrop_schedule("vanilla")  # back to all tokens everywhere
        assert model.hidrop_schedule is None and model.vision_tokens_per_layer() == [N_VIS] * LAYERS
        np.testing.assert_allclose(pick(_torch_logits(model, ids, mask, px)), jax_vanilla, atol=1e-4, rtol=0)
        # a schedule changed after loading: fields over the trained one
        model.set_hidrop_schedule(trained, keep=[4, 2])
        jax_other = np.asarray(forward_hf(_with(cfg, "tok48", keep=(4, 2)), params, ids, px, mask))
        np.testing.assert_allclose(pick(_torch_logits(model, ids, mask, px)), jax_other[valid], atol=1e-4, rtol=0)
        assert [k.shape[1] for k in model.hidrop_kept] == [4, 2]
        model.set_hidrop_schedule(trained, keep=[0.25, 2])  # a fraction of the 16 tokens: 4
        np.testing.assert_allclose(pick(_torch_logits(model, ids, mask, px)), jax_other[valid], atol=1e-4, rtol=0)
        # validated: the field, the value and what is allowed
        for bad, msg in [(dict(keep=[20, 1]), r"hidrop.keep\[0\] = 20 is invalid; allowed: an int in \[1, 16\]"),
                         (dict(prune_after=[2, 7]), r"hidrop.prune_after\[1\] = 7 is invalid; allowed"),
                         (dict(exit_layer=9), r"hidrop.exit_layer = 9 is invalid; allowed: None or an int in \[3, 8\]"),
                         (dict(inject_layer=-1), r"hidrop.inject_layer = -1 is invalid"),
                         (dict(positions="compacted"), r"hidrop.positions = 'compacted' is invalid; allowed: 'persistent'"),
                         (dict(keeps=[1]), r"hidrop.keeps = \[1\] is invalid; allowed: fields")]:
            with pytest.raises(ValueError, match=msg):
                model.set_hidrop_schedule(trained, **bad)
        assert model.config.hidrop["keep"] == [0.25, 2]  # a refused change leaves the schedule as it was
    finally:
        model.set_hidrop_schedule(trained)
    with pytest.raises(ValueError, match="num_beams = 2 is not supported"):
        model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), num_beams=2,
                       max_new_tokens=2)


def test_modeling_file_imports_with_torch_and_transformers_only(tmp_path):
    """Statically: every import is of torch, transformers or the shared `hidrop_torch`. In a
    subprocess where `hidrop_jax` cannot be found, the two files import and a tiny model generates."""
    files = [remote_code.MODELING_FILE, remote_code.HELPER_FILE]
    check_imports(files)
    run_isolated(tmp_path, files, "modeling_hidrop_llava", """
from transformers import CLIPVisionConfig, LlamaConfig
cfg = m.HiDropLlavaConfig(
    vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=28, patch_size=14),
    text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                            num_attention_heads=2, vocab_size=40), image_token_index=39,
    image_seq_length=4, hidrop=dict(inject_layer=1, prune_after=[1], keep=[2], exit_layer=3))
model = m.HiDropLlavaForConditionalGeneration(cfg).eval()
ids = torch.tensor([[1, 2] + [39] * 4 + [3, 4]])
out = model.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=2,
                     min_new_tokens=2)  # random weights may say EOS (id 2) first
assert out.shape == (1, 10) and [k.shape for k in model.hidrop_kept] == [(1, 2)]
""")


@pytest.mark.slow  # builds a small dataset
def test_evaluate_torch_runs_the_trained_schedule(tmp_path):
    """`evaluate_torch(hidrop=True)` (what `make demo` adds) scores the export under its schedule
    with the batch's query rows, as `evaluate_params` does: same logits on a real batch (rounds
    of a conversation as query rows), same accuracy; `hidrop=False` stays vanilla."""
    import tiny_config
    from transformers import AutoModelForImageTextToText
    from hidrop_jax import evaluate as eval_lib
    from hidrop_jax import sharding as shard_lib
    from hidrop_jax.data.setup import open_data
    from hidrop_jax.data import pipeline as data_lib
    from hidrop_jax.model import init_params
    cfg = tiny_config.get_config("schedule=tok64")
    cfg.data.data_dir = str(tmp_path / "data")
    tok, spec, _, src = open_data(cfg, tmp_path)
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    out = save_hf(cfg, params, tmp_path / "hf", tokenizer=tok)
    batch = next(data_lib.eval_batches(src, tok, spec, batch_size=4))
    inputs = to_inputs(batch)[0]
    assert np.asarray(inputs.query_valid).sum() > len(inputs.query_valid)  # several rounds per sample
    want = np.asarray(forward(cfg, params, inputs))
    ids, mask, cols = expand_image_tokens(batch, cfg.model.image_token_id, spec.n_vision)
    has = np.asarray(batch["has_image"])
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    q = np.take_along_axis(cols, np.asarray(batch["query_idx"]), 1)
    got = _torch_logits(model, ids, mask, np.asarray(batch["pixels"])[has].transpose(0, 3, 1, 2),
                        hidrop_query_index=torch.tensor(q),
                        hidrop_query_mask=torch.tensor(np.asarray(batch["query_valid"])))
    valid = np.asarray(batch["text_valid"])
    np.testing.assert_allclose(np.take_along_axis(got, cols[..., None], 1)[valid], want[valid],
                               atol=1e-4, rtol=0)
    mesh = shard_lib.make_mesh((-1, 1, 1))
    jax_acc = eval_lib.evaluate_params(cfg, params, src, tok, spec, mesh, batch_size=4, max_batches=2)
    torch_acc = evaluate_torch(out, src, tok, spec, batch_size=4, max_batches=2, hidrop=True)
    assert jax_acc["rounds"] == torch_acc["rounds"] > 0
    assert jax_acc["accuracy"] == pytest.approx(torch_acc["accuracy"])
    per_type = lambda r: {k: (v["accuracy"], v["rounds"]) for k, v in r["per_type"].items()}
    assert per_type(jax_acc) == per_type(torch_acc)
