"""A CLIP vision tower in and out of Hugging Face format, and its pretraining on shapes_vqa."""

import json

import jax
import numpy as np
import pytest
import torch
from flax.core import meta
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

import tiny_config
from hidrop_jax.config import feature_layers_run
from hidrop_jax.hf.load import load_hf_vision
from hidrop_jax.hf.save import save_hf_vision
from hidrop_jax.data import shapes
from hidrop_jax.layers.clip import init_vision, vision_hidden_state
from hidrop_jax.model import vision_dims
from hidrop_jax.pretrain_tower import dense_labels, pretrain

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=56, patch_size=14, projection_dim=16)  # = tests/tiny_config.py's tower


def _hf_tower(cls=CLIPVisionModel, seed=0):
    torch.manual_seed(seed)
    if cls is CLIPModel:
        model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=50, projection_dim=16)))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    with torch.no_grad():  # HF inits norms to 1/0: randomise them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _penultimate_hf(model, pixels):
    vision = model.vision_model if isinstance(model, CLIPModel) else model
    with torch.no_grad():
        out = vision(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    return out.hidden_states[-2].numpy()


def _ours(cfg, tower, pixels):
    m = cfg.model
    return np.asarray(vision_hidden_state(vision_dims(m), tower, pixels, feature_layers_run(m)))


@pytest.mark.parametrize("cls", [CLIPVisionModel, CLIPModel])
def test_imported_tower_matches_hf(tmp_path, cls):
    """Both key layouts: CLIPModel's `vision_model.*` (the hub's CLIP checkpoints) and the bare
    names transformers 5 writes for a CLIPVisionModel."""
    model = _hf_tower(cls)
    model.save_pretrained(tmp_path)
    cfg = tiny_config.get_config()
    tower = load_hf_vision(cfg, tmp_path)
    pixels = np.random.default_rng(0).normal(size=(2, 56, 56, 3)).astype(np.float32)
    np.testing.assert_allclose(_ours(cfg, tower, pixels), _penultimate_hf(model, pixels), atol=2e-5, rtol=0)


def test_saved_tower_loads_in_transformers_and_back(tmp_path):
    cfg = tiny_config.get_config()
    tower = jax.device_get(meta.unbox(init_vision(vision_dims(cfg.model), jax.random.PRNGKey(3))))
    save_hf_vision(tmp_path / "clip", cfg, tower, metadata={"note": "x"})
    hf, info = CLIPVisionModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert not any(info.values()), info  # transformers only warns about missing/unexpected keys
    from safetensors import safe_open
    with safe_open(str(tmp_path / "clip" / "model.safetensors"), framework="np") as f:
        assert f.metadata()["note"] == "x"
    pixels = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
    np.testing.assert_allclose(_ours(cfg, tower, pixels), _penultimate_hf(hf, pixels), atol=2e-5, rtol=0)
    back = load_hf_vision(cfg, tmp_path / "clip")
    jax.tree.map(np.testing.assert_array_equal, back, tower)
    other = jax.tree.map(lambda x: x + 1, tower)  # overwriting replaces the directory whole
    save_hf_vision(tmp_path / "clip", cfg, other)
    jax.tree.map(np.testing.assert_array_equal, load_hf_vision(cfg, tmp_path / "clip"), other)
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]  # no temporary or old copy left


def test_mismatched_tower_names_what_differs(tmp_path):
    cfg = tiny_config.get_config()
    _hf_tower().save_pretrained(tmp_path / "ok")
    other = tiny_config.get_config()
    other.model.vision.hidden_size = 48
    with pytest.raises(ValueError, match=r"hidden_size = 32 \(config: 48\)"):
        load_hf_vision(other, tmp_path / "ok")
    # a tensor missing from the file, and a wrong model type
    from safetensors.numpy import load_file, save_file
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    t = load_file(str(tmp_path / "ok" / "model.safetensors"))
    del t["encoder.layers.1.mlp.fc2.bias"]
    save_file(t, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'vision_tower\.vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias'"):
        load_hf_vision(cfg, tmp_path / "cut")
    hf = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps(dict(hf, model_type="llava")))
    with pytest.raises(ValueError, match="model_type = 'llava'"):
        load_hf_vision(cfg, tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_vision(cfg, tmp_path / "nowhere")


def test_patch_labels_agree_with_the_drawn_pixels():
    """The labels come from the annotations (geometry); the reference reads the rendered image:
    the share of each patch's pixels that have an object's colour (shapes are flat colours ±18,
    the background is grey). Patches within 3% of the 20% threshold are too close to call."""
    patch, size, g = 28, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE // 28
    colors, bg_kind, bg_col = list(shapes.COLORS), len(shapes.KINDS), len(shapes.COLORS)
    checked = {"background": 0, "object": 0}
    for index in range(12):
        rng = np.random.default_rng([7, index])
        scene = shapes.sample_scene(rng)
        pixels = shapes.draw_scene(scene, rng).astype(int)
        kind, color = dense_labels(scene, patch, size, min_cover=0.2)
        for p in range(g * g):
            cell = pixels[(p // g) * patch:(p // g + 1) * patch, (p % g) * patch:(p % g + 1) * patch]
            cover = {c: np.mean(np.abs(cell - np.asarray(shapes.COLORS[c])).sum(-1) < 40)
                     for c in {s.color for s in scene}}
            above = [c for c, v in cover.items() if v >= 0.23]
            if all(v < 0.17 for v in cover.values()):
                assert (kind[p], color[p]) == (bg_kind, bg_col), (index, p, cover)
                checked["background"] += 1
            elif len(above) == 1 and all(v < 0.17 for c, v in cover.items() if c != above[0]):
                assert colors[color[p]] == above[0], (index, p, cover)
                owners = [s for s in scene if s.color == above[0]]
                if len(owners) == 1:
                    assert shapes.KINDS[kind[p]] == owners[0].kind, (index, p)
                checked["object"] += 1
    assert checked["object"] > 50 and checked["background"] > 1000, checked


def test_pretraining_learns_colour_and_writes_a_loadable_tower(tmp_path):
    """A short run of a 32-wide tower on the demo's grid (28-px patches): colour (6 classes,
    chance 1/6) is learnt in a few dozen steps; the output loads back as the config's tower."""
    cfg = tiny_config.get_config()
    cfg.model.vision.update(image_size=336, patch_size=28)
    with pytest.raises(ValueError, match="min_cover"):  # no object covers a whole patch
        pretrain(cfg, str(tmp_path / "clip"), steps=1, batch=8, lr=3e-3, min_cover=1.0, eval_every=1)
    report = pretrain(cfg, str(tmp_path / "clip"), steps=60, batch=8, lr=3e-3, min_cover=0.2, eval_every=60)
    assert report["curve"][-1]["color_acc"] > 0.5, report["curve"]
    tower = load_hf_vision(cfg, tmp_path / "clip")
    assert tower["embeddings"]["patch_embedding"]["kernel"].shape == (28, 28, 3, 32)


def test_committed_demo_tower_fits_the_demo_config():
    """`assets/tiny_shapes_clip` (what `make demo` starts from) loads into `configs/tiny_shapes.py`
    and records the command that made it."""
    import configs.tiny_shapes as tiny
    from safetensors import safe_open
    cfg = tiny.get_config()
    tower = load_hf_vision(cfg, cfg.train.init_vision)
    assert tower["layers"]["fc1"]["kernel"].shape == (3, 64, 128)
    with safe_open(f"{cfg.train.init_vision}/model.safetensors", framework="np") as f:
        made = json.loads(f.metadata()["hidrop_jax.pretrain_tower"])
    assert made["command"].startswith("python -m hidrop_jax.pretrain_tower --config configs/tiny_shapes.py")


def _position_r2(feats: np.ndarray) -> dict:
    """Held-out R² of a least-squares map token -> its patch's row / column (fit on the first
    half of the images, scored on the second); written here, apart from the training code."""
    n_img, n_tok, _ = feats.shape
    side = int(round(n_tok ** 0.5))
    x = np.c_[feats.reshape(n_img * n_tok, -1), np.ones(n_img * n_tok)]
    half = (n_img // 2) * n_tok
    out = {}
    for name, y in (("row", np.arange(n_tok) // side), ("column", np.arange(n_tok) % side)):
        y = np.tile(y, n_img).astype(np.float64)
        w = np.linalg.lstsq(x[:half], y[:half], rcond=None)[0]
        out[name] = 1 - np.mean((y[half:] - x[half:] @ w) ** 2) / np.var(y[half:])
    return out


def test_position_target_makes_the_tokens_say_where_their_patch_is(tmp_path):
    """With `position`, a short run reports row/column accuracy on every held-out token, and
    the saved tower's feature-layer tokens (read back through the HF loader) give their patch's
    row and column linearly (held-out R², measured apart from the training heads), far better
    than without the target on the same steps and seed."""
    from hidrop_jax.pretrain_tower import dataset_batches
    cfg = tiny_config.get_config()
    cfg.model.vision.update(image_size=336, patch_size=28)
    r2 = {}
    for position in (False, True):
        out = tmp_path / f"clip_{position}"
        report = pretrain(cfg, str(out), steps=60, batch=8, lr=3e-3, min_cover=0.2, eval_every=60,
                          position=position)
        assert report["position"] is position
        assert ("row_acc" in report["curve"][-1]) is position
        tower = load_hf_vision(cfg, out)
        px = np.concatenate([b["pixels"] for b in dataset_batches("validation", 40, 20, 336, 28, 0.2,
                                                                 repeat=False)])
        r2[position] = _position_r2(_ours(cfg, tower, px)[:, 1:])  # CLS dropped, as the LLM sees
    last = report["curve"][-1]
    print(r2, last)
    assert min(r2[True].values()) > 0.5 and min(r2[True].values()) > max(r2[False].values()) + 0.2, r2
    assert last["row_acc"] > 2 / 12 and last["col_acc"] > 2 / 12, last  # chance 1/12
