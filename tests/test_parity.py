"""Logit parity with Hugging Face's PyTorch LlavaForConditionalGeneration on tiny random models."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_tiny import IMAGE_TOKEN, hf_logits, make_batch, make_hf_llava
from hidrop_jax.convert import load_hf
from hidrop_jax.model import encode_image, forward_hf

CONFIGS = {
    "mha": dict(),
    "gqa_full_theta": dict(text=dict(num_key_value_heads=2, rms_norm_eps=1e-5,
                                     rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
                           vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "tied_layer1_gelu": dict(text=dict(num_key_value_heads=1, tie_word_embeddings=True),
                             vision=dict(hidden_act="gelu"), vision_feature_layer=1,
                             tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_llava(d, **CONFIGS[request.param])
    cfg, params = load_hf(d)
    return hf, cfg, params


def _compare(hf, cfg, params, ids, mask, pos, pixels, tol=1e-4):
    ref = hf_logits(hf, ids, mask, pos, pixels)
    out = np.asarray(forward_hf(cfg, params, ids, pixels, mask))
    is_img = ids == IMAGE_TOKEN
    n_img = is_img.sum(1).max()
    assert out.shape == (ids.shape[0], ids.shape[1] - n_img, hf.config.text_config.vocab_size)
    assert out.dtype == np.float32
    worst = 0.0
    for i in range(len(ids)):
        if is_img[i].any():  # row i = the non-image positions of input_ids[i], in order
            keep = np.flatnonzero(~is_img[i])
            rows = np.arange(len(keep))
        else:  # text-only row in an image batch: its valid tokens, padding trimmed
            keep = np.flatnonzero(mask[i])
            rows = np.arange(len(keep)) + (out.shape[1] - len(keep) if mask[i, 0] == 0 else 0)
        valid = mask[i, keep].astype(bool)
        worst = max(worst, np.abs(out[i, rows][valid] - ref[i, keep][valid]).max())
    assert worst <= tol, worst
    return worst


def test_single_image(pair):
    hf, cfg, params = pair
    _compare(hf, cfg, params, *make_batch(hf, [6], [True]))


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ragged_mixed_batch(pair, padding):
    hf, cfg, params = pair
    batch = make_batch(hf, [3, 9, 25, 5], [True, False, True, False], padding=padding, seed=1)
    _compare(hf, cfg, params, *batch)


def test_text_only_batch(pair):
    hf, cfg, params = pair
    _compare(hf, cfg, params, *make_batch(hf, [4, 7], [False, False], seed=2))


def test_nhwc_equals_nchw(pair):
    hf, cfg, params = pair
    ids, mask, _, px = make_batch(hf, [5, 6], [True, True], seed=3)
    a = forward_hf(cfg, params, ids, px, mask)
    b = forward_hf(cfg, params, ids, px.transpose(0, 2, 3, 1), mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vision_features(pair):
    hf, cfg, params = pair
    px = np.random.default_rng(4).normal(size=(2, 3, cfg.model.vision.image_size,
                                               cfg.model.vision.image_size)).astype(np.float32)
    with torch.no_grad():
        c = hf.config
        ref = hf.model.get_image_features(
            pixel_values=torch.tensor(px), vision_feature_layer=c.vision_feature_layer,
            vision_feature_select_strategy=c.vision_feature_select_strategy)
        ref = getattr(ref, "pooler_output", ref)
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
    ours = encode_image(cfg.model, params, jnp.asarray(px.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(ours), ref.reshape(ours.shape).numpy(), atol=1e-5, rtol=0)


def test_bfloat16_compute(tmp_path):
    """bf16 compute, float32 master weights, against the float32 HF reference.

    bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4%); errors add over layers, so we hold
    max |Δlogit| ≤ 5% of the logits' range and top-1 agreement on ≥ 90% of positions."""
    hf = make_hf_llava(tmp_path)
    cfg, params = load_hf(tmp_path)
    cfg.model.dtype = "bfloat16"
    ids, mask, pos, px = make_batch(hf, [8, 12], [True, True], seed=5)
    ref = hf_logits(hf, ids, mask, pos, px)
    out = np.asarray(forward_hf(cfg, params, ids, px, mask))
    keep = ~(ids == IMAGE_TOKEN)
    r = np.stack([ref[i][keep[i]] for i in range(2)])
    assert out.dtype == np.float32
    assert np.abs(out - r).max() <= 0.05 * (r.max() - r.min())
    assert (out.argmax(-1) == r.argmax(-1)).mean() >= 0.9
