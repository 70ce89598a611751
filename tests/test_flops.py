"""XLA's FLOP count of the prefill vs the paper's formula, on a small model (benchmarks/flops.py
runs the same check on LLaVA-1.5-7B).

The formula and the per-layer vision-token counts are written out here by hand, independent of
the library. Counts come from the lowered HLO (`Lowered.cost_analysis`, nothing allocated); the
compiled HLO gives the same counts to ~1e-5 here and on the 7B model, and is ~6× slower to get.
The model is full multi-head attention (the paper's 4nd² assumes d×d K/V projections).

Definitions (see benchmarks/flops.py): XLA vision = [XLA(prefill with image) − XLA(no image) −
XLA(vision tower + projector)] / 2 (XLA counts a multiply-add as 2 FLOPs, the paper's formula
counts multiply-adds); formula = Σ_l [F(n_l + T) − F(T)], F(n) = 4nd² + 2n²d + 3ndm.
"""

import importlib.util
import os

import pytest

from hidrop_jax import perf
from hidrop_jax.config import make_config, model_config, schedule_of
from hidrop_jax.model import abstract_params

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "flops.py")
_spec = importlib.util.spec_from_file_location("benchmarks_flops", _path)
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)

D, M, L, T = 256, 512, 8, 32  # hidden, MLP, layers, text tokens; 48/2 → 24² = 576 vision tokens

# 0-based layer -> vision tokens present, written by hand from each schedule's definition.
SCHEDULES = {
    "vanilla": (dict(inject_layer=0, prune_after=(), keep=(), exit_layer=None),
                [576] * 8),
    "pdrop": (dict(inject_layer=0, prune_after=(1, 3, 5), keep=(288, 144, 72), exit_layer=None),
              [576, 576, 288, 288, 144, 144, 72, 72]),
    "hidrop": (dict(inject_layer=2, prune_after=(3, 4), keep=(215, 10), exit_layer=6),
               [0, 0, 576, 576, 215, 10, 0, 0]),
    "hidrop_deep": (dict(inject_layer=2, prune_after=(2, 3, 4), keep=(87, 10, 1), exit_layer=7),
                    [0, 0, 576, 87, 10, 1, 1, 0]),
}
CUTS = {"vanilla": [], "pdrop": [(576, 288), (288, 144), (144, 72)],
        "hidrop": [(576, 215), (215, 10)], "hidrop_deep": [(576, 87), (87, 10), (10, 1)]}


def F(n):
    return 4 * n * D * D + 2 * n * n * D + 3 * n * D * M


def formula(tokens):
    return sum(F(n + T) - F(T) for n in tokens)


def scoring_formula(n_in):
    """One cut scored alone: k_proj of every token entering it, q_proj of the query row, its
    logits. The keys of the T + k survivors are reused by the next layer (not recomputed)."""
    return (T + n_in) * D * D + D * D + (T + n_in) * D


def reused(k):
    return (T + k) * D * D


@pytest.fixture(scope="module")
def counted():
    m = model_config(
        vision=dict(image_size=48, patch_size=2, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=2),
        text=dict(vocab_size=256, hidden_size=D, intermediate_size=M, num_layers=L,
                  num_heads=2, num_kv_heads=2),
        image_token_id=3)
    cfg = make_config(m, "unroll=True")
    cfg.train.batch_size, cfg.data.max_len = 1, T  # what perf.model_flops counts
    params = abstract_params(cfg)
    text_only = flops.prefill_flops(cfg, params, T, image=False, compile=False)
    tower = flops.tower_flops(cfg, params, compile=False)
    out = {}
    for name, (fields, tokens) in SCHEDULES.items():
        cfg.hidrop.update(fields)
        s = schedule_of(cfg)
        assert s.tokens_per_layer() == tokens, name
        full = flops.prefill_flops(cfg, params, T, image=True, compile=False)
        scoring = [flops.cut_flops(cfg, params, n, k, T, compile=False) / 2 for n, k in CUTS[name]]
        scoring_net = [c - reused(k) for c, (_, k) in zip(scoring, CUTS[name])]
        out[name] = dict(vision=(full - text_only - tower) / 2, scoring=scoring, scoring_net=scoring_net,
                         full=full, model_flops=perf.model_flops(cfg, "forward"))
    return out


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_layers_match_paper_formula(counted, name):
    """The decoder's work on the vision tokens, minus the scoring, is the formula: gathers,
    gates, masks and position tables add nothing measurable (< 3%; ~0.8% is elementwise ops)."""
    r = counted[name]
    ratio = (r["vision"] - sum(r["scoring_net"])) / formula(SCHEDULES[name][1])
    assert abs(ratio - 1) < 0.03, f"{name}: XLA / formula = {ratio:.4f}"


@pytest.mark.parametrize("name", [n for n in SCHEDULES if CUTS[n]])
def test_scoring_costs_one_key_projection(counted, name):
    """Each cut costs what its analytic formula says (k_proj over all entering tokens, q_proj of
    one row, one row of logits): nothing else, e.g. no full attention matrix, no V projection."""
    for (n_in, _), xla in zip(CUTS[name], counted[name]["scoring"]):
        ratio = xla / scoring_formula(n_in)
        assert abs(ratio - 1) < 0.03, f"{name} cut of {n_in}: XLA / formula = {ratio:.4f}"


def test_scan_unrolled_counts_every_layer(counted):
    """Vanilla puts 576 tokens in all 8 layers: a count of one scan body would be ~1/8."""
    ratio = counted["vanilla"]["vision"] / formula(SCHEDULES["vanilla"][1])
    assert 0.97 < ratio < 1.03, ratio


@pytest.mark.parametrize("name", ["pdrop", "hidrop", "hidrop_deep"])
def test_total_is_formula_plus_dropped_keys(counted, name):
    """All the cuts cost beyond the formula is the keys of the tokens they drop (scoring must
    see a token's key to rank it), one query row and its logits: nothing else is hidden."""
    dropped = sum((n - k) * D * D + D * D + (T + n) * D for n, k in CUTS[name])
    ratio = counted[name]["vision"] / (formula(SCHEDULES[name][1]) + dropped)
    assert abs(ratio - 1) < 0.01, f"{name}: XLA / (formula + dropped keys) = {ratio:.4f}"


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_library_count_is_the_whole_forward(counted, name):
    """`perf.model_flops` (the count behind the trainer's MFU and aot's est_mfu) is XLA's count
    of the whole forward (tower, projector, decoder, every row's logits) less the cuts'
    scoring, within 2% (the rest: elementwise ops, 0.9% for vanilla here, mostly the narrow
    tower's softmax; the cuts' gathers and gates add up to 0.6% with three cuts)."""
    r = counted[name]
    ratio = (r["full"] - 2 * sum(r["scoring_net"])) / r["model_flops"]
    assert abs(ratio - 1) < 0.02, f"{name}: XLA / perf.model_flops = {ratio:.4f}"
