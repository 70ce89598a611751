"""Qwen2.5-VL against transformers 5.24's PyTorch `Qwen2_5_VLForConditionalGeneration` on tiny
random models: vision features, M-RoPE positions, logits (ragged, left/right padded, image-less
samples, tied and untied heads), both key layouts on import, a bit-identical export round trip.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_tiny_qwen import IMAGE_TOKEN, hf_logits, image_patches, make_batch, make_hf_qwen
from hidrop_jax.convert import load_hf
from hidrop_jax.hf.save import _flat
from hidrop_jax.families import qwen2_5_vl as fam
from hidrop_jax.model import forward_hf

GRID_PX = (16, 24)  # 8×12 patches, 4×6 merged tokens = 6 windows of 2×2


_MODELS = {}


def _model(tie, tmp_path_factory):
    if tie not in _MODELS:
        d = tmp_path_factory.mktemp("tied" if tie else "untied")
        hf = make_hf_qwen(d, tie=tie)
        _MODELS[tie] = (hf, *load_hf(d, image_size=GRID_PX), d)
    return _MODELS[tie]


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tmp_path_factory):
    """Both heads: for what the head or the weight layout can change."""
    return _model(request.param == "tied", tmp_path_factory)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The tied model only: for what the head cannot change (vision, positions, dtype, schedule)."""
    return _model(True, tmp_path_factory)


def _compare(hf, cfg, params, batch, tol=1e-4):
    ref = hf_logits(hf, batch)
    out = np.asarray(forward_hf(cfg, params, **batch))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    is_img = ids == IMAGE_TOKEN
    assert out.dtype == np.float32
    assert out.shape == (len(ids), ids.shape[1] - is_img.sum(1).max(), ref.shape[-1])
    worst = 0.0
    for i in range(len(ids)):
        if is_img[i].any():  # row i = the non-image positions of input_ids[i], in order
            keep = np.flatnonzero(~is_img[i])
            rows = np.arange(len(keep))
        else:  # an image-less row in an image batch: its valid tokens, padding trimmed
            keep = np.flatnonzero(mask[i])
            rows = np.arange(len(keep)) + (out.shape[1] - len(keep) if mask[i, 0] == 0 else 0)
        valid = mask[i, keep].astype(bool)
        worst = max(worst, np.abs(out[i, rows][valid] - ref[i, keep][valid]).max())
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("size", [(16, 24), (12, 20), (24, 16)])
def test_vision_features(one, size):
    """Window (blocks 0, 2) and full (1, 3) attention; 16×24 tiles 2×3 windows, 12×20 has ragged
    edge windows; two images per call."""
    hf, cfg, params, _ = one
    px, thw = image_patches(np.random.default_rng(0), *size, n=2)
    with torch.no_grad():
        ref = torch.cat(hf.model.get_image_features(torch.tensor(px), torch.tensor(thw)).pooler_output).numpy()
    m = fam.with_grid(cfg.model, thw)
    ours = np.asarray(fam.encode_image(m, params, jnp.asarray(px.reshape(2, -1, px.shape[-1]))))
    np.testing.assert_allclose(ours.reshape(ref.shape), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_rope_index_equals_hf(one, padding):
    hf, cfg, _, _ = one
    b = make_batch([5, 4, 9], [2, None, 0], padding=padding, seed=1)
    ref, _ = hf.model.get_rope_index(
        torch.tensor(b["input_ids"]), torch.tensor(b["mm_token_type_ids"]),
        torch.tensor(b["image_grid_thw"]), attention_mask=torch.tensor(b["attention_mask"]))
    mask = b["attention_mask"].astype(bool)
    ours = fam.rope_index(cfg.model, b["input_ids"], mask, b["input_ids"] == IMAGE_TOKEN)
    np.testing.assert_array_equal(ours[:, mask], ref.numpy()[:, mask])
    # text after the 4×6 image resumes at start + max(4, 6), not start + 24
    i = 0
    after = np.flatnonzero(b["input_ids"][i] == IMAGE_TOKEN)[-1] + 2  # past <|vision_end|>
    start = ours[0, i, np.flatnonzero(b["input_ids"][i] == IMAGE_TOKEN)[0]]
    assert ours[0, i, after] == start + 6 + 1


def test_single_image(pair):
    hf, cfg, params, _ = pair
    _compare(hf, cfg, params, make_batch([6], [3]))


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ragged_batch_with_imageless_sample(pair, padding):
    hf, cfg, params, _ = pair
    _compare(hf, cfg, params, make_batch([5, 4, 9], [2, None, 0], padding=padding, seed=1))


def test_non_square_ragged_windows(one):
    hf, cfg, params, _ = one
    _compare(hf, cfg, params, make_batch([7, 3], [1, 3], h_px=12, w_px=20, seed=2))


def test_text_only_batch(one):
    hf, cfg, params, _ = one
    _compare(hf, cfg, params, make_batch([4, 7], [None, None], padding="left", seed=3))


def test_mm_token_type_ids_checked(one):
    _, cfg, params, _ = one
    b = make_batch([5], [2])
    b["mm_token_type_ids"] = np.zeros_like(b["mm_token_type_ids"])
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        forward_hf(cfg, params, **b)


def test_import_in_memory_layout(pair, tmp_path):
    """5.24's in-memory names (`model.visual.*`, `model.language_model.*`) give the same params
    as the hub layout that `save_pretrained` wrote."""
    hf, cfg, params, d = pair
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    assert any(k.startswith("model.language_model.") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    _, params2 = load_hf(tmp_path, image_size=GRID_PX)
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("shard_bytes", [2**31, 200_000])
def test_export_round_trip(pair, tmp_path, shard_bytes):
    """Export (one file, or shards + index) loads in transformers with every tensor
    bit-identical to the original model's."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from hidrop_jax.hf.save import save_hf
    hf, cfg, params, _ = pair
    out = save_hf(cfg, params, tmp_path / "out", max_shard_bytes=shard_bytes)
    assert (out / "model.safetensors.index.json").exists() == (shard_bytes < 2**31)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"


# Released sizes, written out here from the published configs (not from our config files).
_RELEASED = {
    "qwen2_5_vl_3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie=True),
    "qwen2_5_vl_7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie=False),
}


@pytest.mark.parametrize("name", list(_RELEASED))
def test_param_count_equals_hf(name):
    """Counted from shapes only (jax.eval_shape; torch's meta device)."""
    import importlib

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from hidrop_jax.model import abstract_params, count_params
    cfg = importlib.import_module(f"configs.{name}").get_config("schedule=tok64")
    t = dict(_RELEASED[name])
    tie = t.pop("tie")
    hf_cfg = Qwen2_5_VLConfig(
        text_config=dict(t, rms_norm_eps=1e-6, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=t["hidden_size"], window_size=112, tokens_per_second=2,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=tie)
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    assert count_params(abstract_params(cfg)) == sum(p.numel() for p in hf.parameters())
    assert cfg.hidrop.keep == (215, 10, 5, 1)  # 576 merged tokens: Tok64's counts carry over


def test_schedule_fractions_scale_with_the_grid():
    """keep given as fractions of the vision tokens: one schedule for any grid."""
    from hidrop_jax.hidrop.schedule import Schedule
    at = lambda n: Schedule(num_layers=32, n_vision=n, inject_layer=8, prune_after=(9, 13),  # noqa: E731
                            keep=(0.375, 0.1), exit_layer=24).keep
    assert at(576) == (216, 58)
    assert at(144) == (54, 14)
    assert at(24) == (9, 2)
    with pytest.raises(ValueError, match=r"keep\[0\]"):
        Schedule(num_layers=32, n_vision=576, inject_layer=8, prune_after=(9,), keep=(1.5,))


@pytest.mark.slow
def test_hidrop_fields_change_what_runs(one):
    """cfg.hidrop (counts or fractions) changes forward_hf's logits; equal schedules agree."""
    _, cfg, params, _ = one
    b = make_batch([6, 3], [2, 1], seed=4)
    base = np.asarray(forward_hf(cfg, params, **b))
    counts, fracs = cfg.copy_and_resolve_references(), cfg.copy_and_resolve_references()
    for c, keep in ((counts, (6,)), (fracs, (0.25,))):  # 0.25 of 24 tokens = 6
        c.hidrop.inject_layer, c.hidrop.prune_after, c.hidrop.keep, c.hidrop.exit_layer = 1, (1,), keep, 3
    a, f = np.asarray(forward_hf(counts, params, **b)), np.asarray(forward_hf(fracs, params, **b))
    np.testing.assert_array_equal(a, f)
    assert np.abs(a - base).max() > 1e-3


@pytest.mark.slow
def test_bfloat16_compute(one):
    """bf16 compute, float32 master weights, against the float32 HF reference (bars as for
    LLaVA: max |Δlogit| ≤ 5% of the logits' range, top-1 agreement on ≥ 90% of positions)."""
    hf, cfg, params, _ = one
    cfg = cfg.copy_and_resolve_references()
    cfg.model.dtype = "bfloat16"
    b = make_batch([8, 12], [2, 4], seed=5)
    ref = hf_logits(hf, b)
    out = np.asarray(forward_hf(cfg, params, **b))
    keep = b["input_ids"] != IMAGE_TOKEN
    r = np.stack([ref[i][keep[i]] for i in range(2)])
    valid = np.stack([b["attention_mask"][i][keep[i]] for i in range(2)]).astype(bool)
    assert out.dtype == np.float32
    assert np.abs(out - r)[valid].max() <= 0.05 * (r.max() - r.min())
    assert (out.argmax(-1) == r.argmax(-1))[valid].mean() >= 0.9


@pytest.mark.parametrize("size", [(16, 24), (32, 48)])
def test_preprocess_equals_hf_processor(one, size):
    """Our resize + normalise + patchify against transformers' Qwen2VLImageProcessorPil (its
    smart_resize lands on the same grid when the aspect ratio matches)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    _, cfg, _, _ = one
    img = np.random.default_rng(6).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    h, w = cfg.model.vision.image_size
    proc = Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2,
                                    min_pixels=h * w, max_pixels=h * w)
    ref = proc(images=[img], return_tensors="np")
    assert ref["image_grid_thw"].tolist() == [[1, h // 2, w // 2]]
    np.testing.assert_allclose(fam.preprocess(cfg.model, img), ref["pixel_values"], atol=1e-5, rtol=0)
