"""Export to Hugging Face: tiny random HF LLaVA -> load_hf -> save_hf -> transformers, bit for bit."""

import json

import ml_collections
import numpy as np
import pytest
import torch
from safetensors import safe_open

from hidrop_jax.hf import save as export
from hidrop_jax.convert import canonical_name, load_hf, main
from hidrop_jax.hf.save import save_hf
from hidrop_jax.config import resolved, with_schedule
from hidrop_jax.data.image import CLIP_MEAN, CLIP_STD
from hf_tiny import IMAGE_TOKEN, hf_logits, make_batch, make_hf_llava

VARIANTS = {
    "mha": dict(),
    "gqa": dict(text=dict(num_key_value_heads=2), seed=1),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf(request, tmp_path_factory):
    """(HF model, its save_pretrained dir, cfg, params via load_hf)."""
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    model = make_hf_llava(d, **VARIANTS[request.param])
    cfg, params = load_hf(d)
    return model, d, cfg, params


def _read_dir(d):
    """{name: numpy array} over every safetensors file of a HF directory."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _assert_same_files(a, b):
    """`b` (our export) holds `a`'s tensors bit for bit under legacy hub names (`a`, written by
    transformers 5.x, says `vision_tower.embeddings...` without `vision_model.`)."""
    ta, tb = {canonical_name(k): v for k, v in _read_dir(a).items()}, _read_dir(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert np.array_equal(ta[k], tb[k]), k


def _load_and_compare(model, out):
    """Loads `out` with transformers (offline): no missing/unexpected keys, every tensor equal to
    `model`'s by canonical (legacy hub) name, same logits."""
    from transformers import LlavaForConditionalGeneration
    loaded, info = LlavaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, local_files_only=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = {canonical_name(k): v for k, v in model.state_dict().items()}
    got = {canonical_name(k): v for k, v in loaded.state_dict().items()}
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
    batch = make_batch(model, [5, 9], [True, False], seed=3)
    np.testing.assert_allclose(hf_logits(loaded, *batch), hf_logits(model, *batch), atol=1e-5, rtol=0)
    return loaded


def test_round_trip_bit_identical(hf, tmp_path):
    model, d, cfg, params = hf
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    with_schedule(cfg, "pdrop")  # any schedule travels as is
    out = save_hf(cfg, params, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "hidrop_schedule.json", "hidrop_torch.py",
                                                     "model.safetensors", "modeling_hidrop_llava.py"]  # pdrop: runnable in torch
    _assert_same_files(d, out)  # same names (legacy hub layout), same bits
    _load_and_compare(model, out)
    conf = json.loads((out / "config.json").read_text())
    assert conf["text_config"]["rope_theta"] == conf["text_config"]["rope_parameters"]["rope_theta"]
    assert conf["torch_dtype"] == conf["dtype"] == "float32"
    sched = json.loads((out / "hidrop_schedule.json").read_text())
    assert sched == json.loads(resolved(cfg).hidrop.to_json()) and sched["prune_after"]


def test_sharded_export_loads(hf, tmp_path):
    model, d, cfg, params = hf
    limit = 40_000
    out = save_hf(cfg, params, tmp_path / "out", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in _read_dir(d).values())
    for s in shards:  # over the limit only where one tensor alone is
        t = _read_dir_file(s)
        assert len(t) == 1 or sum(a.nbytes for a in t.values()) <= limit
    _assert_same_files(d, out)
    _load_and_compare(model, out)
    cfg2, params2 = load_hf(out)  # and our own importer reads it back
    assert cfg2.model.to_dict() == cfg.model.to_dict()
    np.testing.assert_array_equal(params2["text"]["layers"]["self_attn"]["k_proj"]["kernel"],
                                  params["text"]["layers"]["self_attn"]["k_proj"]["kernel"])


def _read_dir_file(f):
    with safe_open(str(f), framework="np") as st:
        return {k: st.get_tensor(k) for k in st.keys()}


def test_mismatched_config_names_tensor(hf, tmp_path):
    _, _, cfg, params = hf
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.model.text.num_kv_heads = 1
    with pytest.raises(ValueError, match=r"language_model\.model\.layers\.\*\.self_attn\.k_proj\.weight"):
        save_hf(bad, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.model.vision.num_layers += 1
    with pytest.raises(ValueError, match=r"vision_tower\.vision_model\.encoder\.layers\.\*\.mlp\.fc1\.weight"):
        save_hf(bad, params, tmp_path / "out")


def test_cli_import_then_export(tmp_path):
    model = make_hf_llava(tmp_path / "hf", text=dict(num_key_value_heads=2), seed=2)
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--max-shard-size", "50KB"])
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    _assert_same_files(tmp_path / "hf", tmp_path / "out")
    _load_and_compare(model, tmp_path / "out")
    # a non-empty OUT_DIR is refused unless --overwrite
    with pytest.raises(FileExistsError, match="not empty"):
        main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--overwrite"])
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    _assert_same_files(tmp_path / "hf", tmp_path / "out")
    # a checkpoint whose config.json disagrees with its arrays fails naming the tensor
    conf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    conf["model"]["text"]["intermediate_size"] += 8
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"language_model\.model\.layers\.\*\.mlp\.gate_proj\.weight"):
        main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_interrupted_export_leaves_nothing(hf, tmp_path, monkeypatch):
    _, d, cfg, params = hf
    real, calls = export._write_shard, []

    def dies_midway(path, tensors):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        real(path, tensors)

    monkeypatch.setattr(export, "_write_shard", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_hf(cfg, params, tmp_path / "out", max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor the temporary sibling
    # over an existing export with overwrite=True, the old one survives an interruption
    monkeypatch.setattr(export, "_write_shard", real)
    save_hf(cfg, params, tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(export, "_write_shard", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_hf(cfg, params, tmp_path / "out", max_shard_bytes=40_000, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    _assert_same_files(d, tmp_path / "out")


def _tiny_tokenizer(vocab_size, image_token_id):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    words = special + [f"w{i}" for i in range(len(special), vocab_size)]
    words[image_token_id] = "<image>"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(special + ["<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def test_processor_loads_and_runs(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = make_hf_llava(tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    assert cfg.model.image_token_id == IMAGE_TOKEN
    tok = _tiny_tokenizer(cfg.model.text.vocab_size, IMAGE_TOKEN)
    out = save_hf(cfg, params, tmp_path / "out", tokenizer=tok)
    # what transformers 4.57 reads too: a top-level image processor file, a class name it knows
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(proc).__name__ == "LlavaProcessor"
    assert proc.image_token == "<image>" and proc.patch_size == cfg.model.vision.patch_size
    ip = proc.image_processor
    assert ip.crop_size == {"height": 56, "width": 56} and ip.size == {"shortest_edge": 56}
    np.testing.assert_allclose(ip.image_mean, CLIP_MEAN)
    np.testing.assert_allclose(ip.image_std, CLIP_STD)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), np.uint8))
    inputs = proc(text="w5 w6 <image> w7 w8", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 16  # (56/14)^2, CLS dropped
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 56, 56)
    # the exported model accepts the processor's output (image-token count = feature count)
    loaded = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        got, want = loaded(**inputs).logits, model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_refuses_bad_tokenizer_and_nonempty_dir(tmp_path):
    make_hf_llava(tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match="vocab_size"):
        save_hf(cfg, params, tmp_path / "a", tokenizer=_tiny_tokenizer(cfg.model.text.vocab_size + 4, 95))
    with pytest.raises(ValueError, match="image token"):
        save_hf(cfg, params, tmp_path / "a", tokenizer=_tiny_tokenizer(cfg.model.text.vocab_size, 90))
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_hf(cfg, params, tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "keep me"
    (tmp_path / "c").mkdir()  # an existing empty directory is fine
    save_hf(cfg, params, tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").exists()
