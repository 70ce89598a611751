"""HiDrop properties on a tiny imported model: each could fail if the wiring were wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import make_batch, make_hf_llava
from hidrop_jax.convert import load_hf
from hidrop_jax.hidrop.select import select, soft_mask, soft_rank
from hidrop_jax.hf.inputs import hf_to_inputs
from hidrop_jax.model import forward, forward_hf

SCHED = dict(inject_layer=2, prune_after=(2, 3), keep=(8, 3), exit_layer=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_llava(d, text=dict(num_hidden_layers=6, num_key_value_heads=2))
    cfg, params = load_hf(d)
    batch = make_batch(hf, [4, 9, 6], [True, True, False], seed=7)
    return hf, cfg, params, batch


def _with(cfg, **h):
    c = cfg.copy_and_resolve_references()
    c.hidrop.update(h)
    return c


def _run(cfg, params, batch, **kw):
    ids, mask, _, px = batch
    inputs, _ = hf_to_inputs(cfg.model, ids, px, mask)
    return forward(cfg, params, inputs, **kw)


def test_keep_all_is_bit_identical_to_no_pruning(tiny):
    _, cfg, params, batch = tiny
    base = dict(inject_layer=2, exit_layer=5)
    ref = np.asarray(forward_hf(_with(cfg, **base, prune_after=(), keep=()), params, batch[0], batch[3], batch[1]))
    for sel in ("hard", "relaxed"):
        out = forward_hf(_with(cfg, **base, prune_after=(3,), keep=(16,), selection=sel),
                         params, batch[0], batch[3], batch[1])
        np.testing.assert_array_equal(np.asarray(out), ref)
    # `mask` runs a different graph (scatter instead of gather); XLA fuses it differently: 1 ulp
    out = forward_hf(_with(cfg, **base, prune_after=(3,), keep=(16,), selection="mask"),
                     params, batch[0], batch[3], batch[1])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6, rtol=0)


def test_late_injection_text_layers_ignore_the_image(tiny):
    _, cfg, params, (ids, mask, pos, px) = tiny
    c = _with(cfg, **SCHED)
    a = _run(c, params, (ids, mask, pos, px), return_aux=True)[1]["stage_text"][0]
    b = _run(c, params, (ids, mask, pos, -3.0 * px + 1), return_aux=True)[1]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b["stage_text"][0]))
    # ... and the image does matter once it is injected
    assert np.abs(np.asarray(b["stage_text"][1]) - np.asarray(
        _run(c, params, (ids, mask, pos, px), return_aux=True)[1]["stage_text"][1])).max() > 1e-4


def test_selection_modes_share_the_forward(tiny):
    _, cfg, params, batch = tiny
    hard = np.asarray(_run(_with(cfg, **SCHED, selection="hard"), params, batch))
    relaxed = np.asarray(_run(_with(cfg, **SCHED, selection="relaxed"), params, batch))
    mask = np.asarray(_run(_with(cfg, **SCHED, selection="mask"), params, batch))
    np.testing.assert_array_equal(relaxed, hard)
    np.testing.assert_allclose(mask, hard, atol=1e-5, rtol=0)


def test_text_only_sample_is_unaffected_by_the_schedule(tiny):
    _, cfg, params, batch = tiny
    van = np.asarray(_run(cfg, params, batch))
    hid = np.asarray(_run(_with(cfg, **SCHED), params, batch))
    np.testing.assert_allclose(hid[2], van[2], atol=1e-5, rtol=0)
    assert np.abs(hid[0] - van[0]).max() > 1e-4  # pruning does change samples with an image


def test_relaxed_gradient_reaches_the_scoring_path(tiny):
    _, cfg, params, (ids, mask, _, px) = tiny
    inputs, _ = hf_to_inputs(cfg.model, ids, px, mask)
    w = jax.random.normal(jax.random.PRNGKey(0), (3, inputs.text_ids.shape[1], cfg.model.text.vocab_size))

    def grads(sel):
        c = _with(cfg, **SCHED, selection=sel)
        return jax.jit(jax.grad(lambda p: (forward(c, p, inputs) * w).sum()))(params)

    g_hard, g_rel = grads("hard"), grads("relaxed")
    # the batch holds a text-only sample (no vision slot alive): its soft rank must not be NaN
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(g_rel))
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_hard, g_rel)
    # layer 3 and 4 score the cuts after layers 2 and 3: their q/k weights get extra gradient
    assert diff["text"]["layers"]["self_attn"]["q_proj"]["kernel"] > 1e-6
    assert diff["text"]["layers"]["self_attn"]["k_proj"]["kernel"] > 1e-6


def test_select_gradient_hard_zero_relaxed_nonzero():
    scores = jax.random.uniform(jax.random.PRNGKey(1), (2, 12))
    alive = jnp.ones((2, 12), bool)
    vals = jax.random.normal(jax.random.PRNGKey(2), (2, 5))
    f = lambda s, mode: (select(s, alive, 5, mode, 0.5)[1] * vals).sum()
    assert float(jnp.abs(jax.grad(f)(scores, "hard")).max()) == 0.0
    assert float(jnp.abs(jax.grad(f)(scores, "relaxed")).max()) > 1e-4
    idx_h, gate_h = select(scores, alive, 5, "hard", 0.5)
    idx_r, gate_r = select(scores, alive, 5, "relaxed", 0.5)
    np.testing.assert_array_equal(idx_h, idx_r)
    np.testing.assert_array_equal(gate_r, np.ones((2, 5)))  # forward keeps values exactly
    # the kept set is the k best, in original order
    best = np.sort(np.argsort(-np.asarray(scores), axis=1)[:, :5], axis=1)
    np.testing.assert_array_equal(idx_h, best)


def test_soft_rank_tends_to_the_hard_rank():
    c = jax.random.normal(jax.random.PRNGKey(3), (1, 50))
    alive = jnp.ones((1, 50), bool)
    hard = (np.asarray(c)[0][:, None] >= np.asarray(c)[0][None, :]).mean(1)
    # σ(0) = ½ on the diagonal where the indicator gives 1
    np.testing.assert_allclose(np.asarray(soft_rank(c, alive, 1e-5))[0], hard - 0.5 / 50, atol=1e-6)
    m = np.asarray(soft_mask(c, alive, 10, 1e-5))[0]
    assert m[np.argsort(-np.asarray(c)[0])[:9]].min() > 0.5 > m[np.argsort(-np.asarray(c)[0])[11:]].max()


def test_prompt_content_never_retraces(tiny):
    _, cfg, params, (ids, mask, pos, px) = tiny
    c = _with(cfg, **SCHED)
    f = jax.jit(lambda p, x: forward(c, p, x))
    for seed in range(3):
        ids2 = np.where(ids == 95, ids, np.random.default_rng(seed).integers(3, 90, ids.shape))
        inputs, _ = hf_to_inputs(c.model, ids2, px * seed, mask)
        f(params, inputs)
    assert f._cache_size() == 1
