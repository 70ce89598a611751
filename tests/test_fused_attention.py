"""The fused attention paths against the masked XLA reference (`layers.attention`).

What could fail: sorting by position, the causal-by-index kernel and the segment ids do not
reproduce causality by position when memory is out of position order (the vision block at the
end, pruned tokens, padding, grouped-query heads); the gradients differ; the kernel does not
compile for a real TPU, or XLA partitions it wrongly outside `shard_map`.
The TPU kernel runs on CPU in Pallas' TPU interpret mode.
"""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hidrop_jax.layers.attention import attention, flash_self_attention, resolve


def _case(seed=0, b=2, text=24, vis=16, n=4, kv=2, h=32):
    """A text stream with the image's slots in its middle, the vision block stored last, some
    vision tokens dead (pruned / no image) and right padding."""
    r = np.random.default_rng(seed)
    s = text + vis
    slot = np.array([5, 9])[:b]
    pos = np.zeros((b, s), np.int32)
    valid = np.ones((b, s), bool)
    for i in range(b):
        t = np.arange(text)
        pos[i, :text] = np.where(t >= slot[i], t + vis, t)
        pos[i, text:] = slot[i] + np.arange(vis)
        valid[i, text - 3 - i:text] = False           # padding rows
        valid[i, text + r.choice(vis, 5, replace=False)] = False  # dropped vision tokens
    q, k, v = (jnp.asarray(r.normal(size=(b, s, m, h)), jnp.float32) for m in (n, kv, kv))
    return q, k, v, jnp.asarray(pos), jnp.asarray(valid)


def test_flash_kernel_matches_position_mask_in_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu
    q, k, v, pos, valid = _case()
    want = attention(q, k, v, pos, pos, valid, implementation="xla")
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(flash_self_attention)(q, k, v, pos, valid)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_flash_kernel_gradients_match_in_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu
    q, k, v, pos, valid = _case(seed=1, b=1)
    w = valid[..., None, None].astype(jnp.float32)  # loss on valid rows only

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)
    ref = jax.grad(loss(lambda q, k, v: attention(q, k, v, pos, pos, valid, implementation="xla")),
                   argnums=(0, 1, 2))(q, k, v)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(jax.grad(loss(lambda q, k, v: flash_self_attention(q, k, v, pos, valid)),
                               argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5, rtol=5e-5)


def test_default_attention_follows_the_target_platform():
    """None is the platform's default: the flash kernel on TPU, XLA elsewhere (cuDNN stays an
    explicit choice until it has run on a device); an explicit choice is kept everywhere. The
    model on this CPU host resolves None to XLA."""
    from hidrop_jax.model import text_dims
    import tiny_config
    assert [resolve(None, p) for p in ("tpu", "gpu", "cpu")] == ["pallas", "xla", "xla"]
    assert resolve("xla", "tpu") == "xla" and resolve("cudnn", "cpu") == "cudnn"
    assert text_dims(tiny_config.get_config().model).attention_impl == "xla"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e .[tpu]): no TPU compiler")
def test_tpu_prefill_compiles_with_the_kernel_by_default():
    """The small model's prefill with `attention_impl` left at None, compiled by libtpu for 4
    v5e chips (batch and heads sharded): None resolves to the target's default (the kernel),
    not this CPU host's (XLA), and the kernel is in the compiled HLO as a TPU custom call."""
    from hidrop_jax import aot
    sys.path.insert(0, os.path.dirname(__file__))
    import aot_config
    cfg = aot_config.get_config("schedule=tok64")
    assert cfg.model.attention_impl is None
    cfg.train.update(mesh=(2, 1, 2), batch_size=4)
    chip, devices = aot.topology_devices("v5e:2x2")
    compiled, fits, _ = aot.compile_program(*aot.program(cfg, aot.topology_mesh(cfg, devices), "prefill", 4))
    assert fits
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo


def _tiny_case():
    """The tiny model under Tok64 and a batch whose second sample has no image (its dead vision
    slots share positions with its text)."""
    from hidrop_jax.model import Inputs, init_params
    import tiny_config
    cfg = tiny_config.get_config("schedule=tok64")
    params = init_params(cfg, jax.random.PRNGKey(0))
    r = np.random.default_rng(0)
    b, t, n = 2, 20, 16
    slot = np.array([3, 0])
    rows = np.arange(t)
    pos = np.stack([np.where(rows >= 3, rows + n, rows), rows]).astype(np.int32)
    valid = np.ones((b, t), bool)
    valid[0, 17:], valid[1, 12:] = False, False
    v = cfg.model.vision
    inputs = Inputs(text_ids=jnp.asarray(r.integers(4, 128, (b, t)), jnp.int32), text_pos=jnp.asarray(pos),
                    text_valid=jnp.asarray(valid), image_slot=jnp.asarray(slot, jnp.int32),
                    has_image=jnp.asarray([True, False]),
                    pixels=jnp.asarray(r.normal(size=(b, v.image_size, v.image_size, 3)), jnp.float32))
    return cfg, params, inputs, valid


@pytest.mark.slow
def test_model_forward_with_pallas_equals_xla_in_interpret_mode():
    """The whole tiny model under Tok64 (injection, cuts, exit; the vision block stored after
    the text) with attention_impl=pallas: the same logits on every valid row."""
    from jax.experimental.pallas import tpu as pltpu
    from hidrop_jax.model import forward
    cfg, params, inputs, valid = _tiny_case()
    want = jax.jit(lambda p, x: forward(cfg, p, x))(params, inputs)
    cfg.model.attention_impl = "pallas"
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda p, x: forward(cfg, p, x))(params, inputs)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_generation_with_pallas_equals_xla_in_interpret_mode():
    """Cached generation under Tok64 with attention_impl=pallas: the prefill runs the kernel,
    each decode step's queries against their cache take the XLA path (the kernel serves
    self-attention only); tokens, logits and kept sets equal XLA's."""
    from jax.experimental.pallas import tpu as pltpu
    from hidrop_jax import generate as gen_lib
    cfg, params, inputs, _ = _tiny_case()
    want = gen_lib.generate(cfg, params, inputs, max_new_tokens=3, return_logits=True)
    cfg.model.attention_impl = "pallas"
    with pltpu.force_tpu_interpret_mode():
        got = gen_lib.generate(cfg, params, inputs, max_new_tokens=3, return_logits=True)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(want["tokens"]))
    np.testing.assert_allclose(np.asarray(got["logits"]), np.asarray(want["logits"]), atol=1e-4, rtol=1e-4)
    for a, b in zip(got["kept"], want["kept"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
