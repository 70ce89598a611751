"""Proposing a HiDrop schedule for a new model from the analysis curves (pure numpy).

The curves come from `hidrop_jax.analysis` (similarity, ILVAS, the exit probe); the rules below
turn them into a validated `Schedule`.

Proposal rules (`propose`)
--------------------------
- inject_layer: the vision intra-modal curve's interior local minima (1 ≤ l ≤ L − 2, c[l] <
  c[l − 1] and c[l] ≤ c[l + 1]) each get a dip depth (prominence) min(max c[:l], max c[l+1:]) −
  c[l]; the *earliest* minimum whose depth is at least `min_prominence` (0.5) × the deepest
  one's is chosen (shallow noise dips are ignored; of comparable dips the first, where the layers
  start transforming the vision tokens). No interior minimum: inject at 0 (no late injection).
- exit_layer: the earliest e whose probe loss *stays* within `tolerance` (relative, 2 %) of the
  baseline for every e' ≥ e: loss[e'] ≤ (1 + tol)·loss[L]. e = L means no early exit. Raised to
  inject + 2 if it would leave no room for a cut after injection.
- prune_after: the ILVAS curves (mean over the n given where defined) have interior local maxima
  (s[l] > s[l − 1], s[l] ≥ s[l + 1]); we keep those after injection with room before the exit,
  the `max_cuts` (4) highest, in layer order. A maximum at layer l means layer l's attention
  picks a stable set; our cut after layer p scores with layer p + 1's attention, so the cut goes
  after l − 1: prune_after = l − 1 ∈ [inject, exit − 2]. No maximum: the argmax (one cut).
- keep: a geometric ("concave": steep first cut, long thin tail) profile k_i = k_1·r^(i−1) with
  k_m = 1 (r = k_1^(−1/(m−1))); k_1 is found by bisection so the schedule's mean vision tokens
  per layer (over all L layers) hits `budget`, then rounded (strictly decreasing) and refined
  over integer k_1 to within one token. If k_1 = N is still under budget, the tail end rises
  from 1 (bisection on it). A budget the layer layout cannot reach raises, naming it and the
  reachable range; if it is too small only because the first stage is long, a cut right after
  injection is added first (replacing the first one if max_cuts are used; noted). Validated by
  `schedule.validate`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from hidrop_jax.hidrop.schedule import Schedule


def _finite(c):
    return np.asarray([np.nan if v is None else v for v in c], float)


def local_minima(curve, lo: int = 1, hi: Optional[int] = None):
    """Interior strict-left local minima l in [lo, hi]: c[l] < c[l−1] and c[l] ≤ c[l+1]."""
    c = _finite(curve)
    hi = len(c) - 2 if hi is None else min(hi, len(c) - 2)
    return [l for l in range(max(lo, 1), hi + 1)
            if np.isfinite(c[l - 1:l + 2]).all() and c[l] < c[l - 1] and c[l] <= c[l + 1]]


def local_maxima(curve, lo: int = 1, hi: Optional[int] = None):
    """Interior local maxima l in [lo, hi]: c[l] > c[l−1] and c[l] ≥ c[l+1] (finite)."""
    return local_minima(-_finite(curve), lo, hi)


def pick_injection(vision_curve, min_prominence: float = 0.5):
    """(inject_layer, details): see the module doc's rule."""
    c = _finite(vision_curve)
    if not np.isfinite(c).any():
        raise ValueError("the vision intra-modal curve is empty: no analysed sample has an image")
    cands = local_minima(c)
    if not cands:
        return 0, dict(candidates=[], note="no interior local minimum of the vision curve: "
                                             "inject at layer 0 (no late injection)")
    prom = {l: float(min(np.nanmax(c[:l]), np.nanmax(c[l + 1:])) - c[l]) for l in cands}
    deepest = max(prom.values())
    chosen = next(l for l in cands if prom[l] >= min_prominence * deepest)
    return chosen, dict(candidates=cands, prominence={str(l): p for l, p in prom.items()},
                        min_prominence=min_prominence)


def pick_exit(probe_loss, tolerance: float = 0.02):
    """(exit_layer in 1..L, details) from the probe's loss per exit e = 1..L (index e − 1)."""
    loss = _finite(probe_loss)
    L = len(loss)
    if tolerance < 0:
        raise ValueError(f"tolerance = {tolerance!r}; allowed: ≥ 0 (relative loss increase)")
    base = loss[-1]
    if not np.isfinite(base):
        return L, dict(note="no answer tokens in the data: no exit probe, no early exit")
    ok = loss <= base * (1 + tolerance) + 1e-12
    e = L
    while e > 1 and ok[e - 2]:
        e -= 1
    return e, dict(baseline_loss=float(base), tolerance=tolerance,
                   limit=float(base * (1 + tolerance)))


def pick_prune_layers(ilvas_curves: dict, inject: int, exit_layer: int, max_cuts: int = 4):
    """(prune_after tuple, details): ILVAS local maxima at l ∈ [inject + 1, exit − 1], the
    `max_cuts` highest, cut after l − 1 (see the module doc)."""
    curves = [_finite(c) for c in ilvas_curves.values()]
    if not curves:
        raise ValueError("no ILVAS curve given")
    L = len(curves[0])
    stack = np.stack([np.pad(c, (0, L - len(c)), constant_values=np.nan) for c in curves])
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s = np.nanmean(stack, axis=0)
    lo, hi = inject + 1, exit_layer - 1
    details = dict(combined=[None if not np.isfinite(v) else float(v) for v in s], range=[lo, hi])
    if hi < lo or max_cuts < 1:
        return (), dict(details, note="no room for a cut between injection and exit")
    cands = local_maxima(s, lo, hi)
    details["maxima"] = cands
    if not cands:
        inside = [l for l in range(lo, hi + 1) if np.isfinite(s[l])]
        if inside:
            cands = [max(inside, key=lambda l: s[l])]
            details["note"] = "no ILVAS local maximum after injection: one cut at its argmax"
        else:
            cands = [lo]
            details["note"] = ("ILVAS undefined after injection (too few layers for n): one cut "
                               "right after the injection layer")
    chosen = sorted(sorted(cands, key=lambda l: -s[l] if np.isfinite(s[l]) else 0)[:max_cuts])
    details["ilvas_layers"] = chosen
    return tuple(l - 1 for l in chosen), details


def stage_lengths(num_layers: int, inject: int, prune_after, exit_layer: int):
    """Layers per stage: [first stage (all tokens), after cut 1, ..., after cut m]."""
    cuts = list(prune_after)
    bounds = [inject] + [p + 1 for p in cuts] + [exit_layer]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _geometric(k1: float, m: int, end: float = 1.0):
    if m == 1:
        return [k1]
    r = (end / k1) ** (1.0 / (m - 1))
    return [k1 * r ** i for i in range(m)]


def _integer(raw, n_vision: int):
    """Round, then enforce strictly decreasing counts ≥ 1 from the tail, first ≤ n_vision."""
    k = [max(1, int(round(v))) for v in raw]
    for i in range(len(k) - 2, -1, -1):
        k[i] = max(k[i], k[i + 1] + 1)
    return k if k[0] <= n_vision else None


def solve_keep(n_vision: int, num_layers: int, inject: int, prune_after, exit_layer: int,
               budget: float):
    """Keep counts (a concave/geometric profile ending at 1) whose schedule's mean vision tokens
    per layer is within one token of `budget`; raises naming the budget and the reachable range.
    """
    m = len(prune_after)
    lens = stage_lengths(num_layers, inject, prune_after, exit_layer)
    fixed = n_vision * lens[0]
    mean = lambda k: (fixed + sum(a * b for a, b in zip(k, lens[1:]))) / num_layers
    if budget > n_vision:
        raise ValueError(f"budget = {budget!r} mean vision tokens per layer is larger than the "
                         f"{n_vision} vision tokens of this model")
    if m == 0:
        got = mean([])
        if abs(got - budget) > 1:
            raise ValueError(f"budget = {budget!r} cannot be met without cuts: injection at "
                             f"{inject} and exit at {exit_layer} give {got:.2f} tokens per layer")
        return ()
    lo_k = list(range(m, 0, -1))
    lo_mean = mean(lo_k)
    hi_k = list(range(n_vision, n_vision - m, -1))
    hi_mean = mean(hi_k) if hi_k[-1] >= 1 else lo_mean
    if budget < lo_mean - 1:
        raise ValueError(
            f"budget = {budget!r} is below the {lo_mean:.2f} tokens per layer this layout needs at "
            f"least (all {n_vision} tokens in layers {inject}..{inject + lens[0] - 1}, then "
            f"keep {tuple(lo_k)}); raise the budget or inject/cut earlier")
    if budget > hi_mean + 1:
        raise ValueError(
            f"budget = {budget!r} is above the {hi_mean:.2f} tokens per layer this layout can use "
            f"(injection {inject}, exit {exit_layer}, {m} cuts); lower the budget")
    if m == 1:  # a single cut: its count alone meets the budget
        return (min(range(1, n_vision + 1), key=lambda v: abs(mean([v]) - budget)),)

    def solve_k1(end):
        """Bisection on k_1 for a tail ending at `end`; the closest integer counts (or None)."""
        keep_for = lambda k1: _integer(_geometric(k1, m, end), n_vision)
        lo, hi = max(float(m), end), float(n_vision)
        if keep_for(lo) is None:
            return None
        for _ in range(60):
            mid = (lo + hi) / 2
            km = keep_for(mid)
            if km is None or mean(km) > budget:
                hi = mid
            else:
                lo = mid
        near = [keep_for(v) for v in range(max(m, int(lo) - 2), min(n_vision, int(hi) + 2) + 1)]
        near = [k for k in near if k is not None]
        return min(near, key=lambda k: abs(mean(k) - budget)) if near else None

    # The smallest tail end (1 first) whose solution is concave including the first cut
    # (N → k_1 the largest drop) and within one token of the budget.
    fallback = None
    for end in range(1, n_vision - m + 2):
        k = solve_k1(float(end))
        if k is None or abs(mean(k) - budget) > 1:
            continue
        if is_concave(n_vision, k):
            return tuple(k)
        fallback = fallback or k
    if fallback is None:  # k_1 = N is still under budget: the tail end rises (bisection on it)
        lo, hi = 1.0, float(n_vision)
        for _ in range(60):
            mid = (lo + hi) / 2
            km = _integer(_geometric(n_vision, m, mid), n_vision)
            if km is None or mean(km) > budget:
                hi = mid
            else:
                lo = mid
        cands = [_integer(_geometric(n_vision, m, e), n_vision)
                 for e in np.linspace(max(1.0, lo - 1), hi + 1, 41)]
        cands = [c for c in cands if c is not None]
        fallback = min(cands, key=lambda k: abs(mean(k) - budget)) if cands else None
    if fallback is None or abs(mean(fallback) - budget) > 1:
        got = "none" if fallback is None else f"{tuple(fallback)} giving {mean(fallback):.2f}"
        raise ValueError(f"budget = {budget!r}: no decreasing keep counts within one token "
                         f"(closest: {got})")
    return tuple(fallback)


def is_concave(n_vision: int, keep) -> bool:
    """Strictly decreasing counts whose drops (n_vision → k_1 → … → k_m) never grow."""
    seq = [n_vision, *keep]
    drops = [a - b for a, b in zip(seq[:-1], seq[1:])]
    return all(d > 0 for d in drops[1:]) and all(a >= b for a, b in zip(drops[:-1], drops[1:]))


def propose(*, vision_curve, ilvas_curves: dict, probe_loss, num_layers: int, n_vision: int,
            budget: float, tolerance: float = 0.02, max_cuts: int = 4,
            min_prominence: float = 0.5):
    """The proposed schedule (a validated `Schedule`) and a details dict, from the curves:
    `vision_curve` [L] (intra-modal, vision), `ilvas_curves` {n: [L] with None/NaN where
    undefined}, `probe_loss` [L] (exit e = index + 1). Rules: module doc."""
    L = num_layers
    notes = []
    inject, d_inj = pick_injection(vision_curve, min_prominence)
    probe_exit, d_exit = pick_exit(probe_loss, tolerance)
    exit_layer = probe_exit
    if exit_layer < inject + 2:
        exit_layer = min(L, inject + 2)
        notes.append(f"probe exit {probe_exit} is not after injection {inject} with room for a cut:"
                     f" exit raised to {exit_layer}")
    prune, d_prune = pick_prune_layers(ilvas_curves, inject, exit_layer, max_cuts)
    try:
        keep = solve_keep(n_vision, L, inject, prune, exit_layer, budget)
    except ValueError as first_error:
        # Too small a budget because the first stage is long: cut right after injection first.
        if not prune or prune[0] == inject or "below" not in str(first_error):
            raise
        rest = prune if len(prune) < max_cuts else prune[1:]
        moved = (inject,) + tuple(p for p in rest if p > inject)
        keep = solve_keep(n_vision, L, inject, moved, exit_layer, budget)
        notes.append(f"budget {budget} unreachable with the first cut after layer {prune[0]}: "
                     f"added a cut right after the injection layer {inject}")
        prune = moved
    s = Schedule(num_layers=L, n_vision=n_vision, inject_layer=inject, prune_after=prune,
                 keep=keep, exit_layer=exit_layer)
    details = dict(
        injection=d_inj, exit=dict(d_exit, probe_exit=probe_exit), pruning=d_prune,
        keep=dict(budget=budget, mean_tokens=s.mean_tokens(), concave=is_concave(n_vision, keep),
                  stage_lengths=stage_lengths(L, inject, prune, exit_layer)),
        notes=notes)
    return s, details


def schedule_dict(s: Schedule) -> dict:
    return dict(inject_layer=s.inject_layer, prune_after=list(s.prune_after), keep=list(s.keep),
                exit_layer=s.exit, tokens_per_layer=s.tokens_per_layer(),
                mean_tokens=s.mean_tokens())


def config_flags(s: Schedule) -> str:
    """`--config.hidrop...` overrides of the schedule. ml_collections cannot override a field
    whose value is None, so the exit is always an int (L = no early exit) and the base config
    should use a schedule with an int exit (e.g. `:schedule=tok64`)."""
    tup = lambda t: "'(" + ",".join(map(str, t)) + ("," if len(t) == 1 else "") + ")'"
    return (f"--config.hidrop.inject_layer={s.inject_layer} "
            f"--config.hidrop.prune_after={tup(s.prune_after)} "
            f"--config.hidrop.keep={tup(s.keep)} --config.hidrop.exit_layer={s.exit}")
