"""Layer analysis (`hidrop_jax.analyze`): planted structure is found, the budget solver's keep
counts, the model runs it builds on, the CLI end to end, bad inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
from hidrop_jax import analyze
from hidrop_jax.analysis import plots, probes
from hidrop_jax.batch import first_query_row, to_inputs
from hidrop_jax.hidrop import propose as proposal
from hidrop_jax.hidrop.schedule import Schedule
from hidrop_jax.model import Inputs

DATA = "shapes_vqa:train=8,validation=16,test=8"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random HF LLaVA (4 layers, 16 vision tokens) with the shapes_vqa tokenizer."""
    from hf_tiny import make_hf_llava
    from hidrop_jax.data.tokenizer import shapes_vqa_tokenizer
    d = tmp_path_factory.mktemp("hf")
    make_hf_llava(d, text=dict(vocab_size=128))
    shapes_vqa_tokenizer(str(d))
    return d


# ----------------------------------------------------------------------------- planted structure

def _inputs(B=2, T=6, N=4, before=2):
    """Rows [0, before) precede the image slot; rows after it are shifted by N."""
    rows = np.arange(T)
    pos = np.where(rows < before, rows, rows + N)
    return Inputs(text_ids=np.zeros((B, T), np.int32), text_pos=np.tile(pos, (B, 1)).astype(np.int32),
                  text_valid=np.ones((B, T), bool), image_slot=np.full(B, before, np.int32),
                  has_image=np.ones(B, bool))


def _walk(steps, rows, D=64, seed=0):
    """Hidden states [L + 1, B, S, D]: each layer moves row r by a random step of relative size
    steps[r][l] orthogonal to it, so cos(h_l, h_{l+1}) = 1 / sqrt(1 + step²)."""
    rng = np.random.default_rng(seed)
    L = len(next(iter(steps.values())))
    B, S = rows.shape
    h = np.zeros((L + 1, B, S, D), np.float32)
    h[0] = rng.normal(size=(B, S, D))
    h[0] /= np.linalg.norm(h[0], axis=-1, keepdims=True)
    for l in range(L):
        eps = np.zeros((B, S, 1), np.float32)
        for kind, s in steps.items():
            eps[rows == kind] = s[l]
        g = rng.normal(size=(B, S, D))
        g -= (g * h[l]).sum(-1, keepdims=True) * h[l]  # orthogonal: cos = 1 / sqrt(1 + step²)
        g /= np.linalg.norm(g, axis=-1, keepdims=True)
        nxt = h[l] + eps * g
        h[l + 1] = nxt / np.linalg.norm(nxt, axis=-1, keepdims=True)
    return jnp.asarray(h)


def test_planted_intra_modal_minimum_is_the_injection():
    L, T, N = 12, 6, 4
    inp = _inputs(T=T, N=N)
    rows = np.array([[0, 0, 2, 2, 2, 2, 1, 1, 1, 1]] * 2)  # 0 system, 1 vision, 2 text
    base = np.linspace(0.2, 0.05, L)  # no dips of its own
    vision = base.copy()
    vision[0], vision[L - 1] = 2.0, 2.0  # boundary layers change a lot: never chosen
    vision[3] = 0.3                      # a shallow dip (noise level): skipped
    vision[7] = 1.2                      # the designed dip
    system, text = base.copy(), base.copy()
    system[2], text[5] = 1.0, 1.0
    h = _walk({0: system, 1: vision, 2: text}, rows)
    sums, counts = probes.intra_modal_sums(h, probes.modality_masks(inp, N), np.ones(2, np.float32))
    curves = np.asarray(sums / counts)
    assert counts.tolist() == [4, 8, 8]
    inject, info = proposal.pick_injection(curves[:, 1])
    assert inject == 7, (curves[:, 1], info)
    assert info["candidates"][0] == 3  # the shallow dip was a local minimum, but not deep enough
    assert int(np.argmin(curves[1:-1, 0])) + 1 == 2 and int(np.argmin(curves[1:-1, 2])) + 1 == 5
    # of two comparable dips the earliest wins; no dip at all: no late injection
    c = [0.5, 0.9, 0.6, 0.9, 0.55, 0.9, 0.9]
    assert proposal.pick_injection(c)[0] == 2
    assert proposal.pick_injection([0.5, 0.6, 0.7, 0.8])[0] == 0


def _attention(L, B, H, T, N, same_as_next, seed=0):
    """Query-row attention [L, B, H, T + N] whose vision pattern at layer l + 1 is, for l in
    `same_as_next`, layer l's mixed with a new random one in proportion same_as_next[l] : rest
    (ILVAS(l, l+1) = 1 for 1.0, high for 0.9, lower elsewhere)."""
    rng = np.random.default_rng(seed)
    a = np.zeros((L, B, H, T + N), np.float32)
    for l in range(L):
        vis = rng.dirichlet(np.full(N, 0.3), size=(B, H))
        if l - 1 in same_as_next:
            f = same_as_next[l - 1]
            vis = f * a[l - 1, :, :, T:] / 0.5 + (1 - f) * vis
        a[l, :, :, :T] = 0.5 / T
        a[l, :, :, T:] = 0.5 * vis
    return jnp.asarray(a)


def test_planted_ilvas_maxima_are_the_cuts():
    L, B, H, T, N = 12, 3, 4, 5, 16
    attn = _attention(L, B, H, T, N, same_as_next={1: 1.0, 4: 1.0, 7: 0.9})
    sums, count = probes.ilvas_sums(attn, T, (1,), 4, np.ones(B, np.float32))
    curve = np.asarray(sums[1]) / float(count)
    assert np.allclose(curve[[1, 4]], 1.0, atol=1e-6) and 0.95 < curve[7] < 1.0 - 1e-4
    assert curve[[0, 2, 3, 5, 6, 8]].max() < 0.95, curve
    full = list(curve) + [None]
    # injection at 2: the maximum at 1 comes before it and is ignored; cut after l − 1
    prune, info = proposal.pick_prune_layers({1: full}, inject=2, exit_layer=11)
    assert prune == (3, 6) and info["ilvas_layers"] == [4, 7]
    # two cuts at most: the two highest maxima, in layer order
    assert proposal.pick_prune_layers({1: full}, inject=0, exit_layer=11, max_cuts=2)[0] == (0, 3)
    # no room after injection for the maximum at 7 (exit 8 -> cuts after ≤ 6 scored at ≤ 7)
    assert proposal.pick_prune_layers({1: full}, inject=5, exit_layer=8)[0] == (6,)
    # the token-wise variant finds the same maxima
    s2, _ = probes.ilvas_sums(attn, T, (1,), 4, np.ones(B, np.float32), mode="token")
    assert np.allclose(np.asarray(s2[1])[[1, 4]] / B, 1.0, atol=1e-6)


def test_exit_is_where_the_probe_loss_stays_at_baseline():
    # dips into the tolerance at e = 3 but leaves it again at 4: the exit is 5
    loss = [5.0, 3.0, 2.03, 2.2, 2.01, 2.0, 1.99, 2.0]
    assert proposal.pick_exit(loss, 0.02)[0] == 5
    assert proposal.pick_exit(loss, 0.2)[0] == 3
    assert proposal.pick_exit([3.0, 2.0, 1.0], 0.02)[0] == 3  # every early exit hurts: none


# ----------------------------------------------------------------------------- budget solver

@pytest.mark.parametrize("L,N,inject,prune,exit_layer,budgets", [
    (32, 576, 8, (9, 13, 15, 17), 24, (40, 48, 64, 80, 100)),
    (32, 576, 8, (9, 12, 15, 18), 24, (64, 80)),
    (8, 64, 2, (2, 4, 5), 7, (10, 14, 20)),
    (8, 16, 1, (2, 4), 7, (4, 6)),
    (8, 16, 1, (2,), 6, (5,)),
])
def test_budget_solver_meets_the_budget_with_a_concave_profile(L, N, inject, prune, exit_layer,
                                                               budgets):
    for budget in budgets:
        keep = proposal.solve_keep(N, L, inject, prune, exit_layer, budget)
        s = Schedule(num_layers=L, n_vision=N, inject_layer=inject, prune_after=prune, keep=keep,
                     exit_layer=exit_layer)  # validates
        assert abs(s.mean_tokens() - budget) <= 1, (budget, keep, s.mean_tokens())
        seq = [N, *keep]
        drops = np.diff(seq) * -1
        assert (drops[1:] > 0).all(), keep  # strictly decreasing
        assert drops[0] == drops.max() and (np.diff(drops) <= 0).all(), (budget, keep)
        if N == 576 and budget <= 64:
            assert keep[-1] == 1  # the thin tail ends at one token


def test_budget_solver_names_unreachable_budgets():
    with pytest.raises(ValueError, match=r"budget = 600.*576"):
        proposal.solve_keep(576, 32, 8, (9, 13), 24, 600)
    with pytest.raises(ValueError, match=r"budget = 20 is below"):  # 576·2/32 = 36 already
        proposal.solve_keep(576, 32, 8, (9, 13), 24, 20)
    with pytest.raises(ValueError, match=r"budget = 300 is above"):
        proposal.solve_keep(576, 32, 8, (9, 13), 24, 300)


def test_propose_gives_a_valid_schedule_from_planted_curves():
    L = 12
    vision = [0.5, 0.95, 0.94, 0.8, 0.93, 0.95, 0.96, 0.97, 0.97, 0.98, 0.98, 0.6]
    ilvas = {4: [0.5, 0.6, 0.7, 0.6, 0.8, 0.7, 0.75, 0.7, None, None, None, None],
             2: [0.5, 0.6, 0.7, 0.6, 0.9, 0.7, 0.8, 0.7, 0.6, 0.5, None, None]}
    loss = [3.0, 2.9, 2.5, 2.2, 2.1, 2.1, 2.05, 2.01, 2.0, 2.0, 2.0, 2.0]
    s, info = proposal.propose(vision_curve=vision, ilvas_curves=ilvas, probe_loss=loss, num_layers=L,
                         n_vision=64, budget=12)
    assert (s.inject_layer, s.prune_after, s.exit) == (3, (3, 5), 8)
    assert abs(s.mean_tokens() - 12) <= 1 and info["keep"]["concave"]
    assert Schedule(num_layers=L, n_vision=64, inject_layer=s.inject_layer,
                    prune_after=s.prune_after, keep=s.keep, exit_layer=s.exit) == s
    assert "--config.hidrop.prune_after='(3,5)'" in proposal.config_flags(s)
    # a budget the layout can only reach with a cut right after injection: the first cut moves
    s, info = proposal.propose(vision_curve=vision, ilvas_curves={2: [None] * 5 + [0.5, 0.9, 0.5] + [None] * 4},
                         probe_loss=loss, num_layers=L, n_vision=64, budget=8)
    assert s.prune_after == (3, 5) and s.inject_layer == 3 and info["notes"]
    assert abs(s.mean_tokens() - 8) <= 1


# ----------------------------------------------------------------------------- the model runs

def test_layer_states_and_exit_probe_match_the_model(data_dir):
    """Layer-by-layer states with late injection / early exit equal `forward_hidden` under that
    schedule; the probe's loss at exit e equals `forward`'s with exit_layer = e."""
    from hidrop_jax.data import pipeline as data_lib
    from hidrop_jax.data.sources import load_source
    from hidrop_jax.data.tokenizer import shapes_vqa_tokenizer
    from hidrop_jax.model import forward_hidden, init_params, lm_logits
    cfg = tiny_config.get_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    spec = data_lib.TextImageSpec.for_model(cfg.model, max_len=64)
    src = load_source(DATA, "validation", data_dir)
    batch = next(data_lib.eval_batches(src, shapes_vqa_tokenizer(), spec, batch_size=3,
                                       shard_index=0, shard_count=1))
    inputs, tg = to_inputs(batch)
    q = first_query_row(inputs)
    ins = inputs._replace(query_idx=q[:, None], query_valid=jnp.ones((3, 1), bool))
    w = np.asarray(inputs.has_image, np.float32)

    @jax.jit
    def run(params):
        h, attn = probes.layer_states(cfg, params, inputs, vision_on=probes.vision_flags(4, 1, 3))
        hv, _ = probes.layer_states(cfg, params, inputs)
        nll, tokens, _ = probes.exit_probe(cfg, params, hv, inputs, tg.labels, tg.loss_mask, w)
        return h, attn, nll

    @jax.jit
    def ref(params):
        c1, c2 = tiny_config.get_config(), tiny_config.get_config()
        c1.hidrop.update(inject_layer=1, exit_layer=3)
        c2.hidrop.update(inject_layer=0, exit_layer=2)
        x1, _ = forward_hidden(c1, params, ins)
        x2, _ = forward_hidden(c2, params, inputs)
        logits = lm_logits(cfg.model, params["text"], x2)
        mask = tg.loss_mask & (w[:, None] > 0)
        lp = jax.nn.log_softmax(logits, -1)
        nll = -(jnp.take_along_axis(lp, jnp.where(mask, tg.labels, 0)[..., None], -1)[..., 0] * mask)
        return x1, nll.sum()

    h, attn, nll = run(params)
    x1, nll2 = ref(params)
    np.testing.assert_allclose(h[-1][:, :64], x1, atol=1e-5)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    assert float(attn[0, :, :, 64:].max()) == 0.0  # layer 0 does not see the vision tokens
    np.testing.assert_allclose(nll[1], nll2, rtol=1e-5)


# ----------------------------------------------------------------------------- pictures & CLI

def test_patch_overlay_dims_the_dropped_patches():
    img = np.full((56, 56, 3), 200, np.uint8)
    out = plots.patch_overlay(img, [0, 5], grid=4, scale=4)
    assert out.shape == (224, 224, 3)
    assert (out[60, 60] == 200).all()          # inside kept patch 5 (row 1, col 1)
    assert (out[10, 10] == 200).all()          # inside kept patch 0
    assert (out[100, 200] == 40).all()         # dropped, dimmed to 20 %
    assert (out[56, 60] == (255, 220, 0)).all()  # the frame of a kept patch


def _argv(hf_dir, data_dir, out, *extra):
    return ["--hf", str(hf_dir), "--data", f"{DATA}:validation", "--data-dir", data_dir,
            "--samples", "10", "--batch-size", "4", "--out", str(out), "--budget", "6",
            "--ilvas-n", "1,2", "--topk", "4", "--show", "2", *extra]


def test_cli_end_to_end(hf_dir, data_dir, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "analysis"
    report = analyze.main(_argv(hf_dir, data_dir, out))
    printed = capsys.readouterr().out
    assert "proposed schedule" in printed and "--config.hidrop.keep=" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["samples"] == 10 and rep["model"]["num_layers"] == 4
    assert set(rep["intra_modal"]) == {"system", "vision", "text"}
    assert all(len(v) == 4 for v in rep["intra_modal"].values()) and len(rep["cross_modal"]) == 4
    assert 0.9 < rep["cross_modal"][0] <= 1.0 + 1e-6
    assert rep["ilvas"]["curves"]["1"][3] is None and rep["ilvas"]["curves"]["2"][1] is not None
    assert len(rep["exit_probe"]["loss"]) == 4 and rep["exit_probe"]["answer_accuracy"] is not None
    p = rep["proposal"]
    s = Schedule(num_layers=4, n_vision=16, inject_layer=p["inject_layer"],
                 prune_after=p["prune_after"], keep=p["keep"], exit_layer=p["exit_layer"])
    assert abs(s.mean_tokens() - 6) <= 1 and s.tokens_per_layer() == p["tokens_per_layer"]
    for name in ("intra_modal", "cross_modal", "ilvas", "exit_probe", "schedule"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (800, 450), name
    stages = sorted((out / "stages").glob("sample*_cut*.png"))
    assert len(stages) == 2 * len(p["keep"])
    for f in stages:
        with Image.open(f) as im:
            assert im.size == (224, 224)  # 56-pixel images drawn 4× larger
    assert (out / "schedule_flags.txt").read_text().strip() == p["config_flags"]
    ns = {}
    exec((out / "preset.py").read_text(), ns)
    assert ns["PROPOSED"]["keep"] == tuple(p["keep"])
    assert report["proposal"]["keep"] == p["keep"]


@pytest.mark.parametrize("extra,match", [
    (["--data", "nosuch_data:validation"], "nosuch_data"),
    (["--data", f"{DATA}:nosplit"], "nosplit"),
    (["--budget", "64"], r"--budget 64 .*16 vision tokens"),
    (["--ilvas-n", "4,8"], r"--ilvas-n 4.*this model has 4"),
    (["--topk", "17"], r"--topk 17"),
    (["--ilvas-model", "1:3", "--ilvas-n", "2"], r"--ilvas-n 2.*\[1, 3\)"),
])
def test_bad_inputs_name_the_value(hf_dir, data_dir, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        analyze.main(_argv(hf_dir, data_dir, tmp_path / "x") + extra)
    assert not (tmp_path / "x" / "report.json").exists()


def test_hf_without_tokenizer_fails_clearly(tmp_path, data_dir):
    from hf_tiny import make_hf_llava
    make_hf_llava(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"no tokenizer in .*bare.*--tokenizer"):
        analyze.main(_argv(tmp_path / "bare", data_dir, tmp_path / "x"))
