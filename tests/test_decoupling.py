"""Parallel decoupling, read from the compiled HLO: with late injection, the vision tower, the
projector and the injection layer's vision K/V depend on the pixels and not on the text, and the
shallow layers depend on the text and not on the pixels. Matmul FLOPs of each class are checked
against the model's shapes counted by hand (not by the library's formulas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
from hidrop_jax import xla_graph
from hidrop_jax.config import schedule_of, with_schedule
from hidrop_jax.model import Inputs, abstract_params, encode_image, forward, init_params

B, T = 2, 16


def _hlo(cfg):
    x = Inputs(jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.int32),
               jax.ShapeDtypeStruct((B, T), jnp.bool_), jax.ShapeDtypeStruct((B,), jnp.int32),
               jax.ShapeDtypeStruct((B,), jnp.bool_), jax.ShapeDtypeStruct((B, 56, 56, 3), jnp.float32),
               None, None)
    fn = jax.jit(lambda p, x: forward(cfg, p, x), keep_unused=True)
    return fn.lower(abstract_params(cfg), x).compile().as_text()


def _by_hand(cfg):
    """FLOPs (2 per multiply-add) of the text-only layers and of the vision branch."""
    t, v = cfg.model.text, cfg.model.vision
    d, m, hd, h, kvh = t.hidden_size, t.intermediate_size, t.head_dim, t.num_heads, t.num_kv_heads
    kv = 2 * d * kvh * hd                                   # k_proj + v_proj per token
    layer = B * T * (2 * d * h * hd + kv + 3 * d * m) + B * h * 2 * T * T * hd
    n_patch, s = (v.image_size // v.patch_size) ** 2, (v.image_size // v.patch_size) ** 2 + 1
    vd, vm = v.hidden_size, v.intermediate_size
    tower = B * n_patch * v.patch_size ** 2 * 3 * vd        # patch convolution
    tower += (v.num_layers - 1) * (  # feature layer −2: the last CLIP layer does not run
        B * s * (4 * vd * vd + 2 * vd * vm) + B * v.num_heads * 2 * s * s * (vd // v.num_heads))
    projector = B * n_patch * (vd * d + d * d)
    return layer, B * T * kv, tower + projector + B * n_patch * kv


@pytest.mark.parametrize("schedule", ["tok64", "vanilla"])
def test_vision_branch_is_independent_of_the_text(schedule):
    cfg = tiny_config.get_config()
    with_schedule(cfg, schedule)
    res = xla_graph.branches(_hlo(cfg), {"text": ("x.text",), "image": ("x.pixels",)})
    layer, text_kv, vision = _by_hand(cfg)
    inject = schedule_of(cfg).inject_layer
    assert (schedule == "vanilla") == (inject == 0)
    # Text-only: the layers before injection + the injection layer's K/V of the text rows.
    assert res["text"] == pytest.approx(2 * (inject * layer + text_kv), rel=1e-9)
    # Pixels-only: patch conv, the CLIP layers run, projector, the injection layer's vision K/V.
    assert res["image"] == pytest.approx(2 * vision, rel=1e-9)


def test_precomputed_vision_equals_pixels():
    """`forward(..., vision=encode_image(...))` (the serial pipeline, or an image reused across
    prompts) gives the logits of the fused forward."""
    cfg = tiny_config.get_config("schedule=tok64")
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    pos = np.arange(T) + np.where(np.arange(T) >= 4, 16, 0)
    x = Inputs(jnp.asarray(rng.integers(5, 128, (B, T)), jnp.int32),
               jnp.asarray(np.broadcast_to(pos, (B, T)), jnp.int32), jnp.ones((B, T), bool),
               jnp.full((B,), 4, jnp.int32), jnp.asarray([True, False]),
               jnp.asarray(rng.normal(size=(B, 56, 56, 3)), jnp.float32), None, None)
    fused = forward(cfg, params, x)
    vision = encode_image(cfg.model, params, x.pixels)
    serial = forward(cfg, params, x._replace(pixels=None), vision=vision)
    np.testing.assert_allclose(np.asarray(serial), np.asarray(fused), atol=1e-6, rtol=0)
    # and the image matters (the check above is not vacuous)
    other = forward(cfg, params, x._replace(pixels=None), vision=vision[::-1])
    assert np.abs(np.asarray(other) - np.asarray(fused))[0].max() > 1e-4
