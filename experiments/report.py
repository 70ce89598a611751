"""RESULTS.md from the experiments' JSON lines: tables (mean ± std over seeds), the
accuracy-vs-mean-tokens Pareto plot, and a verdict per paper claim computed from the numbers.

Comparisons are paired by seed (seed k of two rows shares initialisation and data order): the
difference of two rows is the mean of their per-seed differences, with its standard error; a
difference counts when it is larger than two standard errors (≥ 2 common seeds; else "cannot
tell"). The rules are fixed before the results exist and nothing is tuned to meet them.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

from experiments.tables import TABLES

DEFAULT_STEPS = 1500  # experiments/run.py's; its reason is written in the report

QTYPES = ("color", "shape", "count", "exist", "position")
CHANCE = dict(color=1 / 6, shape=1 / 5, position=1 / 4, exist=1 / 2)  # count: its answer prior
# Seconds per training step on this 2-core machine when idle, from `make demo` (README, measured
# 2026-12-01): Tok64 0.29 s per step; vanilla 2.4× slower. Other rows: vanilla × the timing
# pass's ratio. Fixed costs per unit (start, compile, test evaluation) are estimates until a
# finished line measures the evaluation.
IDLE_VANILLA_STEP_S = 0.29 * 2.4
START_S, EVAL_S, ANALYZE_S = 60.0, 60.0, 120.0
PAPER = dict(tok64=98.3, tok48=96.5, relaxed=99.7, hard=97.7, persistent=97.6, group=97.0, compacted=96.4)


# ----------------------------------------------------------------------------- statistics

def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(a: dict, b: dict, scale_b: float = 1.0):
    """Mean and standard error of a[seed] − scale_b·b[seed] over the common seeds; None if < 2."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - scale_b * b[s] for s in seeds]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d)


def fmt(m, s=None, pct=False, digits=3):
    if m is None:
        return "–"
    if pct:
        return f"{100 * m:.1f}" + ("" if s is None else f" ± {100 * s:.1f}")
    return f"{m:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}")


# ----------------------------------------------------------------------------- collect

def collect(setup, seeds):
    """{table: {row: {"lines": {seed: line}, "row": Row}}} for this budget."""
    from experiments.run import read_lines
    out = {}
    for table in TABLES:
        lines = [r for r in read_lines(setup.results / f"{table}.jsonl") if r.get("budget") == setup.budget]
        out[table] = {}
        for row in setup.rows(table):
            got = {r["seed"]: r for r in lines if r["row"] == row.name and r["seed"] in seeds}
            out[table][row.name] = dict(row=row, lines=got)
    return out


def acc_by_seed(entry, qtype=None) -> dict:
    out = {}
    for s, r in entry["lines"].items():
        if "error" in r:
            continue
        out[s] = r["accuracy"] if qtype is None else r["per_type"].get(qtype)
    return {s: v for s, v in out.items() if v is not None}


def timing_for(setup, row):
    from experiments.run import read_lines, _timing_setup
    from experiments.tables import train_key
    if row.train is None and not row.from_proposal:
        key = "vanilla"
    elif row.from_proposal:
        return None
    else:
        key = train_key(row.train)
    for rec in reversed(read_lines(setup.results / "timing.jsonl")):
        if rec.get("setup") == _timing_setup(setup) and key in rec.get("ratio", {}):
            return rec["ratio"][key]
    return None


def expected_seconds(setup, data, table, row, eval_s) -> float | None:
    """One seed of `row` on an idle 2-core machine: its own work (a training-free row or the
    proposal row also needs the vanilla model of that seed, counted in vanilla's row)."""
    ratio = timing_for(setup, row)
    if row.from_proposal:
        ratio = 0.5  # unknown before analyze proposes; HiDrop-like schedules measure ~0.4–0.5
    if ratio is None:
        return None
    if row.train is None and not row.from_proposal:
        return eval_s + (ANALYZE_S if row.evaluate == "proposal" else 0.0)
    s = START_S + setup.steps * IDLE_VANILLA_STEP_S * ratio + eval_s
    return s + (ANALYZE_S if row.from_proposal else 0.0)


def _minutes(s):
    return "?" if s is None else (f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h")


# ----------------------------------------------------------------------------- tables

def table_md(setup, data, table, seeds, vanilla, eval_s, only_group=None) -> list:
    head = ("| row | what | seeds | accuracy (mean ± std) | % of vanilla | "
            + " | ".join(QTYPES) + " | vision tokens / layer | FLOPs ratio | train-step ratio | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, e in data[table].items():
        row = e["row"]
        if only_group is not None and row.ablation != only_group:
            continue
        acc = acc_by_seed(e)
        m, s = _mean_std(acc.values())
        ok = [r for r in e["lines"].values() if "error" not in r]
        errors = [r["error"] for r in e["lines"].values() if "error" in r]
        pct = "–"
        if m is not None and vanilla:
            pct = f"{100 * m / vanilla:.1f}"
        per = []
        for q in QTYPES:
            qm, qs = _mean_std([r["per_type"].get(q) for r in ok])
            per.append(fmt(qm, qs if len(ok) > 1 else None, digits=2))
        tokens = _mean_std([r["mean_vision_tokens"] for r in ok])[0]
        flops = _mean_std([r["flops_ratio"] for r in ok])[0]
        tr = timing_for(setup, row)
        if tr is None:
            tr = _mean_std([r.get("train_step_ratio") for r in ok])[0]
        missing = [sd for sd in seeds if sd not in e["lines"]]
        if missing:
            cmd = (f"`python experiments/run.py --table {table} --rows {name} --seeds "
                   f"{','.join(map(str, missing))} --steps {setup.steps}`")
            est = expected_seconds(setup, data, table, row, eval_s)
            after = " after vanilla's" if row.base else ""
            status = (f"pending: seeds {','.join(map(str, missing))}; {cmd} (~{_minutes(est)} per seed"
                      f"{after})")
        else:
            status = "done"
        if errors:
            status = f"no result: {errors[0]}"
        what = row.label + (" (training-free)" if row.train is None and not row.from_proposal else "")
        lines.append(
            f"| {name} | {what} | {len(acc)}/{len(seeds)} | {fmt(m, s if len(acc) > 1 else None)} | {pct} | "
            + " | ".join(per) + f" | {fmt(tokens, digits=1)} | {fmt(flops, digits=3)} | "
            f"{fmt(tr, digits=2)} | {status} |")
    return lines


def other_budget_lines(setup, table: str) -> list:
    """`table`'s finished lines of the same config and sets at another number of steps."""
    from experiments.run import read_lines
    return [r for r in read_lines(setup.results / f"{table}.jsonl")
            if r.get("config") == setup.config and r.get("sets", []) == setup.sets
            and r.get("steps") != setup.steps and "error" not in r]


def other_budgets_md(setup, data) -> list:
    """Rows that also ran at another number of steps (same config, sets and seeds), seed by seed
    beside this budget's line, and each one's paired gap to vanilla per budget: whether a
    difference is the method's or the budget's."""
    out = []
    for table in TABLES:
        other = other_budget_lines(setup, table)
        by = {(r["row"], r["seed"], r["steps"]): r for r in other}
        by.update({(n, s, setup.steps): r for n, e in data[table].items()
                   for s, r in e["lines"].items() if "error" not in r})
        for name in dict.fromkeys(r["row"] for r in other):
            for seed in sorted({r["seed"] for r in other if r["row"] == name}):
                for steps in sorted(st for (n, sd, st) in by if (n, sd) == (name, seed)):
                    r = by[(name, seed, steps)]
                    van = by.get(("vanilla", seed, steps)) if table == "methods" else None
                    gap = "–" if van is None else f"{100 * (r['accuracy'] - van['accuracy']):+.1f}"
                    per = " | ".join(fmt(r["per_type"].get(q), digits=2) for q in QTYPES)
                    out.append(f"| {table}/{name} | {seed} | {steps} | {r['accuracy']:.3f} | {gap} | {per} |")
    if not out:
        return []
    return ["## Other budgets", "",
            "Rows that also ran at another number of steps (same config, seed, data order; the "
            "learning-rate schedule spans each run's steps), seed by seed. Gap = accuracy − the same "
            "seed's vanilla at the same budget, in points. For example "
            "`python experiments/run.py --table methods --rows vanilla,tok64 --seeds 0 --steps 3000`.",
            "", "| row | seed | steps | accuracy | gap to vanilla | " + " | ".join(QTYPES) + " |",
            "|" + "---|" * (5 + len(QTYPES)), *out, ""]


# ----------------------------------------------------------------------------- plot

def pareto_png(data, path: Path) -> int:
    """Accuracy (mean ± std over seeds) vs mean vision tokens per layer, every finished row;
    the Pareto front (best accuracy at ≤ tokens) drawn as a step line. Returns the points drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = []
    for table in TABLES:
        for name, e in data[table].items():
            ok = [r for r in e["lines"].values() if "error" not in r]
            if not ok:
                continue
            m, s = _mean_std([r["accuracy"] for r in ok])
            tok = statistics.fmean(r["mean_vision_tokens"] for r in ok)
            if table == "ablations" and e["row"].train == {"name": "tok64"}:
                continue  # the same model as methods/tok64
            pts.append((tok, m, s, name if table == "methods" else f"abl:{name}", table))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for tok, m, s, label, table in pts:
        ax.errorbar(tok, m, yerr=s, fmt="o" if table == "methods" else "s", capsize=3,
                    color="C0" if table == "methods" else "C1", alpha=0.9)
        ax.annotate(label, (tok, m), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front, best = [], -1.0
    for tok, m, *_ in sorted(pts):
        if m > best:
            front.append((tok, m))
            best = m
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", lw=1,
                label="Pareto front")
        ax.legend(loc="lower right")
    ax.set_xlabel("mean vision tokens per layer")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("accuracy vs vision tokens (methods: circles, ablations: squares)")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(pts)


# ----------------------------------------------------------------------------- verdicts

def _cmp(d, what: str):
    """(sign, text) of a paired difference: +1 / −1 beyond 2 SE, 0 within."""
    if d is None:
        return None, f"{what}: fewer than 2 common seeds"
    m, se, n = d
    sign = 1 if m > 2 * se else -1 if m < -2 * se else 0
    return sign, f"{what}: {100 * m:+.1f} points ± {100 * se:.1f} (SE, {n} seeds)"


def budget_gaps(row: str, other: list) -> str:
    """'; at N steps: row − vanilla ±x points (k seeds)' for each other budget where both ran
    with a common seed: whether a gap at this budget survives a longer (or shorter) training."""
    by = {(r["row"], r["seed"], r["steps"]): r["accuracy"] for r in other}
    txt = ""
    for steps in sorted({st for (_, _, st) in by}):
        seeds = [sd for (n, sd, st) in by if n == row and st == steps and ("vanilla", sd, st) in by]
        if seeds:
            gap = statistics.fmean(by[(row, sd, steps)] - by[("vanilla", sd, steps)] for sd in seeds)
            txt += (f"; at {steps} steps: {row} − vanilla {100 * gap:+.1f} points ({len(seeds)} "
                    f"seed{'s' * (len(seeds) > 1)}, \"Other budgets\")")
    return txt


def verdicts(data, vanilla_acc, other_budgets=()) -> list:
    """The claims' verdicts at this budget; `other_budgets`: the methods' lines at other budgets, quoted
    beside the retention claims (`budget_gaps`), never part of a verdict."""
    M, A = data["methods"], data["ablations"]
    acc = lambda t, r: acc_by_seed(t[r]) if r in t else {}  # noqa: E731
    out = []
    # 1. retention
    for r, paper in (("tok64", PAPER["tok64"]), ("tok48", PAPER["tok48"])):
        a, v = acc(M, r), acc(M, "vanilla")
        sign, txt = _cmp(paired(a, v, paper / 100), f"{r} − {paper}% × vanilla")
        ratio = (statistics.fmean(a.values()) / statistics.fmean(v.values())) if a and v else None
        rtxt = "" if ratio is None else f"; ours keeps {100 * ratio:.1f}% of vanilla"
        above = _cmp(paired(a, v), f"{r} − vanilla")
        if sign is None:
            verdict = "cannot tell yet"
        elif sign >= 0:
            verdict = "holds"
            if above[0] == 1:
                verdict = "holds, but disagrees in direction: HiDrop is *above* vanilla here, not a small cost"
        else:
            verdict = "does not hold"
        out.append((f"HiDrop {r.capitalize()} keeps {paper}% of vanilla", verdict, txt + rtxt + budget_gaps(r, other_budgets)))
    # 2. vs PyramidDrop and FastV at equal mean tokens
    parts, signs = [], []
    for other in ("pdrop_matched", "fastv_matched"):
        sign, txt = _cmp(paired(acc(M, "tok64"), acc(M, other)), f"tok64 − {other}")
        parts.append(txt)
        signs.append(sign)
    for other in ("pdrop", "fastv", "fastv_free"):  # for information: 3× the tokens
        parts.append(_cmp(paired(acc(M, "tok64"), acc(M, other)), f"tok64 − {other} (more tokens)")[1])
    if any(s is None for s in signs):
        v = "cannot tell yet"
    elif all(s == 1 for s in signs):
        v = "holds"
    elif any(s == -1 for s in signs):
        v = "does not hold"
    else:
        v = "cannot tell at this scale (within noise)"
    out.append(("HiDrop beats PyramidDrop and FastV at equal mean tokens", v, "; ".join(parts)))
    # 3. relaxed vs hard
    sign, txt = _cmp(paired(acc(A, "relaxed_t0.1"), acc(A, "hard")), "relaxed (T 0.1) − hard")
    txt2 = _cmp(paired(acc(A, "relaxed_t1"), acc(A, "hard")), "relaxed (T 1.0) − hard")[1]
    v = {None: "cannot tell yet", 1: "holds", -1: "does not hold",
         0: "cannot tell at this scale (within noise; the paper's gap is 2.0 points)"}[sign]
    out.append(("the relaxed top-k beats a hard top-k (99.7% vs 97.7%)", v, f"{txt}; {txt2}"))
    # 4. positions
    s1, t1 = _cmp(paired(acc(A, "persistent"), acc(A, "group")), "persistent − group")
    s2, t2 = _cmp(paired(acc(A, "persistent"), acc(A, "compacted")), "persistent − compacted")
    t3 = _cmp(paired(acc(A, "group"), acc(A, "compacted")), "group − compacted")[1]
    if s1 is None or s2 is None:
        v = "cannot tell yet"
    elif s1 == 1 and s2 == 1:
        v = "holds"
    elif s1 == -1 or s2 == -1:
        v = "does not hold"
    else:
        v = "cannot tell at this scale (within noise; the paper's gaps are 0.6 and 1.2 points)"
    out.append(("persistent positions beat group and compacted (97.6 / 97.0 / 96.4%)", v, "; ".join((t1, t2, t3))))
    # 5. sweeps
    for group, cheap_first, what in (("inject", True, "later injection"), ("exit", False, "earlier exit")):
        pts = sorted((e["row"].x, name) for name, e in A.items() if e["row"].ablation == group)
        if not cheap_first:
            pts = pts[::-1]  # from the latest exit (no exit) to the earliest
        accs = [acc(A, n) for _, n in pts]
        if any(len(a) < 2 for a in accs):
            out.append((f"moving to {what} costs little until a plateau ends", "cannot tell yet",
                        f"{sum(len(a) >= 2 for a in accs)}/{len(accs)} sweep points have ≥ 2 seeds"))
            continue
        means = [statistics.fmean(a.values()) for a in accs]
        best = accs[max(range(len(accs)), key=lambda i: means[i])]
        flags = [(_cmp(paired(a, best), "") [0] == -1) for a in accs]
        desc = ", ".join(f"{n}: {100 * m:.1f}{'*' if f else ''}" for (_, n), m, f in zip(pts, means, flags))
        first_drop = next((i for i, f in enumerate(flags) if f), None)
        if first_drop is None:
            v = "cannot tell at this scale: no sweep point is significantly below the best"
        elif first_drop >= 2 and all(flags[first_drop:]):
            v = "holds"
        else:
            v = "does not hold: the drop starts at once or is not monotone"
        out.append((f"moving to {what} costs little until a plateau ends", v,
                    f"accuracy % along the sweep ({'earliest' if cheap_first else 'latest'} first; "
                    f"* = below the best by > 2 SE): {desc}"))
    return out


# ----------------------------------------------------------------------------- the file

def write_report(setup, out: Path, seeds) -> Path:
    from experiments.run import read_lines
    data = collect(setup, seeds)
    done = [r for t in data.values() for e in t.values() for r in e["lines"].values()]
    evals = [r["eval_seconds"] for r in done if r.get("eval_seconds")]
    eval_s = statistics.median(evals) if evals else EVAL_S
    van = acc_by_seed(data["methods"]["vanilla"])
    vanilla = statistics.fmean(van.values()) if van else None
    png = setup.results / "pareto.png"
    n_pts = pareto_png(data, png)
    rel_png = os.path.relpath(png, out.parent.absolute())
    timing = [r for r in read_lines(setup.results / "timing.jsonl")]
    n_units = sum(len(seeds) for t in data.values() for _ in t)
    est = {t: [expected_seconds(setup, data, t, e["row"], eval_s) for e in data[t].values()] for t in TABLES}
    per_seed = {t: None if None in v else sum(v) for t, v in est.items()}  # None: no timing pass yet
    L = [
        "# Does HiDrop's story hold? (issue 19)",
        "",
        f"The paper's comparisons and ablations on the bundled task (`shapes_vqa`, the demo's tiny "
        f"LLaVA: `{setup.config}`, {setup.num_layers} layers, {setup.n_vision} vision tokens), "
        f"each row trained for **{setup.steps} steps** (budget `{setup.budget}`), seeds "
        f"{', '.join(map(str, seeds))} (`train.seed` = seed: the same initialisation and data order "
        f"for every row), scored on the **test** split (1,000 examples; validation only for "
        f"`analyze`'s choice). Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        f"`python experiments/run.py --report --steps {setup.steps}` from `experiments/results/*.jsonl`: "
        f"**{len(done)} of {n_units} (table, row, seed) units finished**.",
        "",
        "Continue (resumable; a finished unit is never redone, a half-trained run resumes from its "
        "last checkpoint; safe to stop with SIGTERM or a kill at any time):",
        "",
        "```bash",
        "setsid nohup nice -n 10 experiments/queue.sh > experiments/queue.log 2>&1 &   # every unit, most informative first, two at a time (WORKERS=2)",
        f"nohup .venv/bin/python experiments/run.py --table methods --steps {setup.steps} > experiments/methods.log 2>&1 &  # or one table, seeds outermost",
        f".venv/bin/python experiments/run.py --report --steps {setup.steps}   # this file",
        "```",
        "",
        "The rows use the demo's tower (`assets/tiny_shapes_clip`, pretrained with `--position`: its "
        "tokens say where their patch is, so existence and position questions can leave chance).",
        "",
        f"Expected time per seed on this 2-core machine when idle (\"?\": the table's timing pass has "
        f"not run yet): methods ~{_minutes(per_seed['methods'])}, "
        f"ablations ~{_minutes(per_seed['ablations'])} (rows shared with methods counted again; "
        "see each pending row).",
        "",
        "## Budget",
        "",
        *([] if setup.steps == DEFAULT_STEPS else [
            f"**This report is for a {setup.steps}-step budget, not the default {DEFAULT_STEPS}; the "
            "reasoning below is the default's.**", ""]),
        f"{setup.steps} steps of {setup.batch} samples per row, for every row (as the demo trains). "
        "Chosen so that one seed of the methods table fits in about 2 hours of an otherwise idle "
        "2-core machine: its 9 trained models at the step times `make demo` measured here (Tok64 "
        "0.29 s, vanilla 0.70 s per step) scaled by the timing pass's ratios sum to ~3.4 s per step "
        "(estimated before the pass: vanilla 1, PyramidDrop/FastV ~0.7, the ~25-token rows ~0.45 "
        "of vanilla's step), i.e. ~85 min for 1,500 steps, plus ~2 min per row to start, compile and "
        "evaluate on the test split and one `analyze` (~20 min): ~1 h 45 min. "
        f"With the measured ratios the estimate is ~{_minutes(per_seed['methods'])} per seed. 2,000 steps "
        "would take ~2 h 15 min; 1,500 keeps a margin for the shared machine. Nothing was tuned per row.",
        "",
        "Columns: accuracy = answers right / answers (teacher-forced, all answer tokens must be right); "
        "% of vanilla = mean / mean of `methods/vanilla`; per question type mean ± std (chance: colour "
        "1/6, shape 1/5, position 1/4, exist 1/2; count's answer prior ~0.5); vision tokens / layer = the "
        "paper's \"average tokens\" of the evaluated schedule; FLOPs ratio = vision-token FLOPs of the "
        "decoder vs vanilla (`hidrop.schedule.vision_flops`, the paper's 4nd² + 2n²d + 3ndm per layer); "
        "train-step ratio = median train step vs vanilla's, all schedules timed side by side in one "
        "process (`experiments/timing.py`; not the runs' own wall clock, which shares the machine).",
        "",
        "## Methods",
        "",
        *table_md(setup, data, "methods", seeds, vanilla, eval_s),
        "",
        "## Ablations at Tok64",
        "",
    ]
    for group, title in (("selection", "Top-k operator"), ("positions", "Positions after a cut"),
                         ("inject", "Injection layer (exit fixed)"), ("exit", "Exit layer (injection fixed)")):
        L += [f"### {title}", "", *table_md(setup, data, "ablations", seeds, vanilla, eval_s, group), ""]
    L += [
        "## Accuracy vs vision tokens",
        "",
        f"![accuracy vs mean vision tokens]({rel_png})",
        "",
        f"{n_pts} rows with results (every finished method; ablation rows that are the methods' Tok64 "
        "model are drawn once). Rows still pending are missing from the plot.",
        "",
        "## Verdicts on the paper's claims",
        "",
        "Paired by seed; a difference counts when it exceeds 2 standard errors. \"Cannot tell yet\": "
        "fewer than 2 finished seeds. Nothing was tuned toward the paper's numbers.",
        "",
        "| claim (paper) | verdict | evidence |",
        "|---|---|---|",
    ]
    other = other_budget_lines(setup, "methods")
    for claim, v, ev in verdicts(data, vanilla, other):
        L.append(f"| {claim} | **{v}** | {ev} |")
    L += ["", "Scale caveats: " + scale_notes(data, other), ""]
    L += other_budgets_md(setup, data)
    if timing:
        # Each pass times vanilla beside the schedules it adds; the machine's load differs between
        # passes (vanilla took 0.85 to 15.6 s here), so a step is only comparable to the vanilla
        # step of its own pass, shown beside it.
        seen = {}
        for rec in timing:
            if rec.get("setup", "").startswith(setup.config):
                seen.update({k: (rec, rec["step_s"][k], rec["ratio"][k]) for k in rec["ratio"] if k != "vanilla"})
        t = timing[-1]
        L += ["## Timing passes", "",
              f"{t['device']}, {t['cpu_count']} CPUs, batch {t['batch_size']}, {t['text_rows']} text rows, "
              f"median of {t['repeats']} interleaved rounds. Each row's latest pass, with vanilla's step "
              "from the same pass (only the ratio is comparable across rows):", "",
              "| schedule | pass (UTC) | step (s) | vanilla in that pass (s) | ratio to vanilla |",
              "|---|---|---|---|---|"]
        L += [f"| {k} | {rec['time']} | {s:.3f} | {rec['step_s']['vanilla']:.3f} | {r:.2f} |"
              for k, (rec, s, r) in seen.items()]
        L.append("")
    out.write_text("\n".join(L) + "\n")
    return out


def types_at_other_budgets(q: str, rows, other) -> str:
    """'; at N steps: vanilla 0.19, tok64 0.61 (k seeds)': question type `q` of vanilla and `rows`
    at each other budget where vanilla and one of them ran (does more training close it?)."""
    txt = ""
    for steps in sorted({r["steps"] for r in other}):
        xs = {row: [r["per_type"][q] for r in other if (r["row"], r["steps"]) == (row, steps)
                    and r.get("per_type", {}).get(q) is not None] for row in ("vanilla", *rows)}
        xs = {row: v for row, v in xs.items() if v}
        if "vanilla" in xs and len(xs) > 1:
            ns = {len(v) for v in xs.values()}
            seeds = (f"{min(ns)} seed{'s' * (min(ns) > 1)}" if len(ns) == 1 else
                     "seeds: " + ", ".join(f"{row} {len(v)}" for row, v in xs.items()))
            txt += (f"; at {steps} steps: " + ", ".join(f"{row} {statistics.fmean(v):.2f}" for row, v in xs.items())
                    + f" ({seeds})")
    return txt


def scale_notes(data, other=()) -> str:
    """Which question types vanilla leaves at chance, and whether any method leaves it there: a
    type at chance for every row cannot separate the methods; one only vanilla fails is where a
    method's lead over vanilla comes from. `other`: the methods' lines at other budgets, whose
    figures for such a type are quoted beside it."""
    def type_mean(entry, q):
        return _mean_std([r["per_type"][q] for r in entry["lines"].values()
                          if "error" not in r and r["per_type"].get(q) is not None])[0]

    ok = [r for r in data["methods"]["vanilla"]["lines"].values() if "error" not in r]
    if len(ok) < 2:
        return "vanilla has fewer than 2 finished seeds."
    at_chance, separating = [], []
    for q, c in CHANCE.items():
        xs = [r["per_type"].get(q) for r in ok if r["per_type"].get(q) is not None]
        m, s = _mean_std(xs)
        if m is None or m - c >= 2 * s / math.sqrt(len(xs)) + 0.03:
            continue
        above = {row: type_mean(e, q) for row, e in data["methods"].items() if row != "vanilla"}
        above = {row: v for row, v in above.items() if v is not None and v > max(c + 0.05, m + 0.03)}
        if above:
            separating.append(f"{q} (vanilla {m:.2f}, chance {c:.2f}; above it: "
                              + ", ".join(f"{row} {v:.2f}" for row, v in above.items())
                              + types_at_other_budgets(q, above, other) + ")")
        else:
            at_chance.append(f"{q} {m:.2f} (chance {c:.2f})")
    if not at_chance and not separating:
        return "every question type of vanilla is above chance."
    notes = []
    if separating:
        notes.append("vanilla stays at chance where other rows leave it, on " + "; ".join(separating)
                     + ": this is where their lead over vanilla comes from (at this budget vanilla "
                     "training has not learned to read these facts from the vision tokens; a longer "
                     "budget's figures, where one ran, follow each type)")
    if at_chance:
        notes.append("every method stays at chance on " + ", ".join(at_chance)
                     + ": these question types cannot separate the methods at this budget")
    return "; ".join(notes) + "."
