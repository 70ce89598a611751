"""HF import: every key layout, sharded files, and clear errors for bad checkpoints/configs."""

import importlib
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from hf_tiny import make_batch, make_hf_llava
from hidrop_jax.config import schedule_of
from hidrop_jax.checkpoint import load_checkpoint
from hidrop_jax.convert import config_from_hf, config_to_hf, load_hf
from hidrop_jax.model import abstract_params, count_params, forward_hf, init_params


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_llava(d)
    return d


def _tensors(d):
    return load_file(str(d / "model.safetensors"))


def _write(d, tensors, config_from):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text((config_from / "config.json").read_text())
    save_file(tensors, str(d / "model.safetensors"))


LAYOUTS = {
    "legacy_hub": lambda k: k.replace("vision_tower.", "vision_tower.vision_model."),
    "v5_runtime": lambda k: ("lm_head." + k[len("language_model.lm_head."):]) if k.startswith("language_model.lm_head")
    else "model." + k.replace("language_model.model.", "language_model."),
}
LAYOUTS["v5_runtime_vision_model"] = lambda k: LAYOUTS["v5_runtime"](LAYOUTS["legacy_hub"](k))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_key_layouts_import_identically(hf_dir, tmp_path, layout):
    _, ref = load_hf(hf_dir)
    _write(tmp_path, {LAYOUTS[layout](k): v for k, v in _tensors(hf_dir).items()}, hf_dir)
    _, got = load_hf(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, got, ref)


def test_sharded_with_index(hf_dir, tmp_path):
    _, ref = load_hf(hf_dir)
    t = _tensors(hf_dir)
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    _, got = load_hf(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, got, ref)


def test_bad_tensors_are_all_named(hf_dir, tmp_path):
    t = _tensors(hf_dir)
    del t["language_model.model.layers.1.mlp.up_proj.weight"]
    t["language_model.model.layers.0.self_attn.q_proj.bias"] = np.zeros(48, np.float32)
    t["multi_modal_projector.linear_2.weight"] = np.zeros((48, 7), np.float32)
    _write(tmp_path, t, hf_dir)
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "missing tensor 'language_model.model.layers.1.mlp.up_proj.weight'" in msg
    assert "unexpected tensor 'language_model.model.layers.0.self_attn.q_proj.bias' (48,)" in msg
    assert "'multi_modal_projector.linear_2.weight' has shape (48, 7), expected (48, 48)" in msg


@pytest.mark.parametrize("field,value,needle", [
    ("projector_hidden_act", "relu", "model.projector.hidden_act"),
    ("vision_feature_select_strategy", "cls_only", "model.select_strategy"),
    ("vision_feature_layer", [-2, -1], "vision_feature_layer"),
    ("text_config.hidden_act", "gelu", "model.text.hidden_act"),
    ("text_config.attention_bias", True, "text_config.attention_bias"),
    ("vision_config.model_type", "siglip_vision_model", "vision_config.model_type"),
])
def test_unsupported_config_names_field(hf_dir, tmp_path, field, value, needle):
    c = json.loads((hf_dir / "config.json").read_text())
    *parents, leaf = field.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    (tmp_path / "config.json").write_text(json.dumps(c))
    (tmp_path / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")) as e:
        load_hf(tmp_path)
    assert repr(value) in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)


def test_bad_pixels_and_image_tokens(hf_dir):
    cfg, params = load_hf(hf_dir)
    hf = make_hf_llava(None)
    ids, mask, _, px = make_batch(hf, [5], [True])
    with pytest.raises(ValueError, match="expected images of 56×56×3"):
        forward_hf(cfg, params, ids, px[:, :, :28, :28], mask)
    two = np.concatenate([ids, ids], axis=1)  # two images in one sample
    with pytest.raises(ValueError, match="multiple images per sample are not supported"):
        forward_hf(cfg, params, two, px, np.ones_like(two))
    with pytest.raises(ValueError, match="pixel_values is None"):
        forward_hf(cfg, params, ids, None, mask)


def test_import_cli_writes_loadable_checkpoint(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-m", "hidrop_jax.convert", "import-hf", str(hf_dir), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg, params = load_checkpoint(out)
    _, ref = load_hf(hf_dir)
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    s = schedule_of(cfg)
    assert s.prune_after == () and s.exit == cfg.model.text.num_layers and s.inject_layer == 0


@pytest.mark.parametrize("name", ["llava15_7b", "llava15_13b", "tiny_shapes"])
def test_param_count_equals_hf(name):
    """Counted from shapes only: nothing is allocated on either side (torch meta device)."""
    cfg = importlib.import_module(f"configs.{name}").get_config()
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(LlavaConfig(**config_to_hf(cfg)))
    assert count_params(abstract_params(cfg)) == sum(p.numel() for p in hf.parameters())


def test_bad_attention_impl_names_the_field():
    from hidrop_jax.config import model_config
    with pytest.raises(ValueError, match="model.attention_impl.*'flash'.*cudnn"):
        model_config(vision=dict(image_size=28, patch_size=14, hidden_size=8, intermediate_size=8,
                                 num_layers=1, num_heads=1),
                     text=dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1),
                     attention_impl="flash")


def test_initializer_range_means_what_it_means_in_hf():
    """`model.text.initializer_range` is the std of every LLM and projector weight at
    initialisation, as in transformers (which draws them from N(0, initializer_range²)); the
    vision tower keeps CLIP's 0.02. Export writes the field and import reads it back."""
    cfg = importlib.import_module("configs.tiny_shapes").get_config()
    cfg.model.text.initializer_range = 0.1
    ours = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in
            jax.tree_util.tree_leaves_with_path(init_params(cfg, jax.random.PRNGKey(0)))}
    hf_cfg = LlavaConfig(**config_to_hf(cfg))
    assert hf_cfg.text_config.initializer_range == 0.1
    assert config_from_hf(config_to_hf(cfg)).model.text.initializer_range == 0.1
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_cfg)
    hf_std = [p.detach().std().item() for n, p in hf.named_parameters()
              if p.ndim == 2 and "vision_tower" not in n]  # linear weights and embeddings
    assert len(hf_std) == 7 * cfg.model.text.num_layers + 4 and np.allclose(hf_std, 0.1, rtol=0.05)
    matrices = {k: x for k, x in ours.items() if x.ndim >= 2 and k.endswith(("kernel", "embedding"))}
    assert len(matrices) == 9 + 2 + 8  # text: 7 stacked kernels, embedding, lm_head; projector:
    # 2 kernels; vision: patch conv, position embedding, 6 stacked kernels
    for k, x in matrices.items():
        want = 0.02 if k.startswith("vision/") else 0.1
        assert abs(x.std() / want - 1) < 0.05, (k, x.std())
    from hidrop_jax.config import validate_model
    cfg.model.text.initializer_range = 0.0
    with pytest.raises(ValueError, match="model.text.initializer_range.*0.0.*positive"):
        validate_model(cfg.model)
