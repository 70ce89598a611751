"""experiments/: the tables' rows, the resumable runner and the report (issue 19).

The runner is exercised as users run it (a subprocess per invocation) on tests/tiny_config.py
(4 layers, 16 vision tokens, a 64/16/16-example shapes_vqa) with a 2-step budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ is scripts beside the package, as benchmarks/

from experiments import tables  # noqa: E402
from hidrop_jax.hidrop.schedule import preset  # noqa: E402


# ----------------------------------------------------------------------------- rows (no training)

@pytest.mark.parametrize("L,N", [(8, 144), (4, 16), (32, 576)])
def test_every_row_is_a_valid_schedule_and_shared_models_share_a_run(L, N):
    rows = {t: {r.name: r for r in tables.rows(t, L, N)} for t in tables.TABLES}
    for t in rows.values():
        for r in t.values():
            if r.train is not None:
                f = {k: v for k, v in r.train.items() if k != "name"}
                preset(r.train["name"], L, N, **f)  # validates (raises on a bad layout)
    tok64 = tables.train_key(rows["methods"]["tok64"].train)
    # the ablations' reference rows are the methods table's Tok64 model, not a retraining
    for name in ("hard", "persistent", f"inject{preset('tok64', L, N).inject_layer}",
                 f"exit{preset('tok64', L, N).exit}"):
        assert tables.train_key(rows["ablations"][name].train) == tok64, name
    keys = [tables.train_key(r.train) for r in rows["ablations"].values() if r.train]
    assert len(set(keys)) == len(keys) - 3  # only those three repeat


def test_matched_baselines_have_tok64s_mean_tokens():
    """At Tok64's mean tokens per layer (the paper compares at equal mean tokens); counted here
    from the per-layer token list, independently of the helpers' arithmetic."""
    for L, N in ((8, 144), (32, 576)):
        target = preset("tok64", L, N).mean_tokens()
        m = {r.name: r for r in tables.rows("methods", L, N)}
        for name in ("pdrop_matched", "fastv_matched"):
            f = dict(m[name].train)
            s = preset(f.pop("name"), L, N, **f)
            assert abs(sum(s.tokens_per_layer()) / L - target) <= 1.0, (name, s.tokens_per_layer())


def test_sweeps_move_one_layer_and_keep_the_rest():
    L, N = 8, 144
    t64 = preset("tok64", L, N)
    ab = [r for r in tables.rows("ablations", L, N) if r.ablation in ("inject", "exit")]
    assert {r.x for r in ab if r.ablation == "inject"} == set(range(0, t64.exit - 1))
    assert {r.x for r in ab if r.ablation == "exit"} == set(range(t64.inject_layer + 2, L + 1))
    for r in ab:
        f = dict(r.train)
        s = preset(f.pop("name"), L, N, **f)
        if r.ablation == "inject":
            assert (s.inject_layer, s.exit) == (r.x, t64.exit)
        else:
            assert (s.inject_layer, s.exit) == (t64.inject_layer, r.x)
        # the kept counts are Tok64's, in order, as far as the cuts fit
        assert s.keep == t64.keep[:len(s.keep)] and len(s.keep) >= 1


# ----------------------------------------------------------------------------- the runner

def _queue(tmp_path, workers):
    """experiments/queue.sh run with a stand-in interpreter that records its arguments: the
    run.py calls, one argument list per line (workers write in any order)."""
    log = tmp_path / f"calls{workers}"
    fake = tmp_path / "py"
    fake.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "experiments" / "queue.sh")], capture_output=True, text=True,
                       env=dict(os.environ, PY=str(fake), ROOT_DIR=str(tmp_path), CALLS=str(log),
                                WORKERS=str(workers)), timeout=60)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    return log.read_text().splitlines()


def test_queue_covers_every_unit_headline_seeds_first(tmp_path):
    """experiments/queue.sh (what a later session restarts) asks for every (table, row, seed) of
    the default 8-layer config, each row by a name its table has, vanilla's and Tok64's seeds 1
    and 2 before any other row."""
    calls = _queue(tmp_path, 1)
    asked = []
    for line in calls:
        a = line.split()
        assert a[0] == "experiments/run.py" and a[a.index("--root") + 1] == str(tmp_path)
        table, rows, seed = a[a.index("--table") + 1], a[a.index("--rows") + 1], int(a[a.index("--seeds") + 1])
        names = [x.name for x in tables.rows(table, 8, 144)]
        for row in rows.split(",") if rows != "--seeds" else names:  # "" = the whole table
            assert row in names, (table, row)
            asked.append((table, row, seed))
    want = {(t, x.name, s) for t in tables.TABLES for x in tables.rows(t, 8, 144) for s in (0, 1, 2)}
    assert set(asked) == want
    first_other = min(i for i, (t, row, _) in enumerate(asked) if row not in ("vanilla", "fastv_free", "tok64"))
    assert {("methods", x, s) for x in ("vanilla", "tok64") for s in (1, 2)} <= set(asked[:first_other])
    longer = [l.split() for l in calls if "--steps" in l]
    assert sorted((a[a.index("--rows") + 1], a[a.index("--steps") + 1]) for a in longer) == [
        ("tok64", "4500"), ("vanilla", "4500")]  # the budget check of the headline pair


def test_queue_workers_share_the_units_once_each(tmp_path):
    """WORKERS=k runs k shares of the same calls: together exactly the one-worker queue's, none
    twice, none lost; a WORKERS that is not a whole number >= 1 is refused by name."""
    one = sorted(_queue(tmp_path, 1))
    for k in (2, 3):
        assert sorted(_queue(tmp_path, k)) == one
    for bad in ("0", "two", "-1"):
        r = subprocess.run(["bash", str(ROOT / "experiments" / "queue.sh")], capture_output=True, text=True,
                           env=dict(os.environ, PY="/bin/false", ROOT_DIR=str(tmp_path), WORKERS=bad), timeout=60)
        assert r.returncode == 2 and f"WORKERS={bad};" in r.stderr, (bad, r.stderr)


def _run(root, *args, steps=2, timeout=900, **kw):
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--config", "tests/tiny_config.py",
           "--root", str(root), "--steps", str(steps), "--timing-repeats", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def _lines(root, table="methods"):
    p = Path(root) / "results" / f"{table}.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    r = _run(root, "--table", "methods", "--rows", "vanilla", "--seeds", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    return root


@pytest.mark.slow
def test_a_row_appends_one_line_with_its_measures(finished):
    (line,) = _lines(finished)
    assert (line["table"], line["row"], line["seed"], line["split"], line["step"]) == ("methods", "vanilla", 0, "test", 2)
    # the answers of the 16 test examples, per type, add up; accuracy is their weighted mean
    assert sum(line["per_type_rounds"].values()) == line["rounds"] > 0
    assert line["accuracy"] == pytest.approx(
        sum(line["per_type"][k] * n for k, n in line["per_type_rounds"].items()) / line["rounds"])
    assert line["vision_tokens_per_layer"] == [16] * 4 and line["mean_vision_tokens"] == 16  # (56/14)²
    assert line["flops_ratio"] == 1.0 and line["train_step_ratio"] == 1.0
    assert line["train_step_s"] > 0
    wd = finished / line["workdir"]
    assert (wd / "checkpoints" / "2").is_dir()
    assert json.loads((wd / "config.json").read_text())["train"]["seed"] == 0


@pytest.mark.slow
def test_running_again_does_nothing(finished):
    wd = finished / _lines(finished)[0]["workdir"]
    logs = {p: p.read_text() for p in (wd / "train.log", wd / "eval.log")}
    timing = (finished / "results" / "timing.jsonl").read_text()
    r = _run(finished, "--table", "methods", "--rows", "vanilla", "--seeds", "0")
    assert r.returncode == 0, r.stderr
    assert "vanilla/seed0: done before" in r.stdout
    assert len(_lines(finished)) == 1
    assert {p: p.read_text() for p in logs} == logs  # nothing was launched
    assert (finished / "results" / "timing.jsonl").read_text() == timing


def test_a_row_that_trains_a_finished_rows_model_takes_its_result(tmp_path):
    """The ablations' `hard` and `persistent` rows train exactly methods' Tok64 (same schedule,
    seed and data order): once that line exists they take its result instead of training the
    model again, and say whose it is; a row with another schedule or seed does not."""
    from experiments.run import Setup, run_unit, same_run_result
    setup = Setup("tests/tiny_config.py", 2, [], tmp_path)
    tok64 = dict(table="methods", row="tok64", seed=0, budget=setup.budget, sets=[], trained_schedule={"name": "tok64"},
                 training_free=False, accuracy=0.625, per_type={"count": 0.625}, workdir="runs/x/tok64/seed0")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "methods.jsonl").write_text(json.dumps(tok64) + "\n")
    rows = {r.name: r for r in setup.rows("ablations")}
    for name in ("hard", "persistent"):
        assert run_unit(setup, "ablations", rows[name], 0).startswith("the same model as methods/tok64")
    got = _lines(tmp_path, "ablations")
    assert [(x["row"], x["same_as"], x["accuracy"], x["per_type"]) for x in got] == [
        (n, "methods/tok64", 0.625, {"count": 0.625}) for n in ("hard", "persistent")]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoints"))
    assert same_run_result(setup, rows["group"].train, 0) is None  # another schedule
    assert same_run_result(setup, rows["hard"].train, 1) is None  # another seed


@pytest.mark.expensive  # ~17 min on the loaded 2-core host: `pytest -m expensive`, not in CI
def test_a_killed_runner_resumes_its_training(tmp_path):
    """SIGKILL the runner mid-training: its trainer is told (SIGTERM), saves and exits; the next
    invocation waits for it, resumes from the saved step (history.jsonl) and finishes the row."""
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--config", "tests/tiny_config.py",
           "--root", str(tmp_path), "--steps", "40", "--timing-repeats", "1", "--table", "methods",
           "--rows", "tok64", "--seeds", "0", "--set", "train.ckpt_every=2"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = next(iter(tmp_path.glob("runs/*/tok64/seed0")), tmp_path / "none") / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts.is_dir() and any(c.name.isdigit() for c in ckpts.iterdir())):
        time.sleep(0.5)
        ckpts = next(iter(tmp_path.glob("runs/*/tok64/seed0")), tmp_path / "none") / "checkpoints"
    assert ckpts.is_dir(), "no checkpoint appeared"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _lines(tmp_path) == []
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = _lines(tmp_path)
    assert (line["row"], line["step"]) == ("tok64", 40)
    history = [json.loads(x) for x in (ckpts.parent / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["from_step"] >= 2, history


# ----------------------------------------------------------------------------- the report

@pytest.mark.slow
def test_report_shows_finished_and_pending_rows_and_the_pareto_plot(finished, tmp_path):
    out = tmp_path / "RESULTS.md"
    r = _run(finished, "--report", "--seeds", "0,1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    van = next(l for l in md.splitlines() if l.startswith("| vanilla |"))
    assert "1/2" in van and "pending: seeds 1" in van
    tok = next(l for l in md.splitlines() if l.startswith("| tok64 |"))
    assert "0/2" in tok and "--table methods --rows tok64 --seeds 0,1 --steps 2" in tok
    assert "cannot tell yet" in md
    png = finished / "results" / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert f"]({os.path.relpath(png, tmp_path)})" in md


def test_verdicts_follow_the_numbers(tmp_path):
    """Synthetic results with differences far beyond / far within their noise: each verdict is
    the one the paired 2-SE rule must give (seeds 0..3; noise ±0.002 per seed, in another order per row)."""
    from experiments.report import write_report
    from experiments.run import Setup, append_line
    setup = Setup("configs/tiny_shapes.py", 2, [], tmp_path)  # 8 layers: sweeps of 5 points
    wiggle = (0.002, -0.002, 0.001, -0.001)
    acc = dict(vanilla=0.50, tok64=0.56, tok48=0.40, pdrop_matched=0.45, fastv_matched=0.44,
               hard=0.56, persistent=0.56, **{"relaxed_t0.1": 0.50, "relaxed_t1": 0.56},
               group=0.5605, compacted=0.5595)
    for table in ("methods", "ablations"):
        for i, row in enumerate(setup.rows(table)):
            for seed in range(4):
                w = wiggle[(seed + i) % 4]  # each row its own order: paired differences vary
                a = acc.get(row.name, 0.5)
                if row.ablation == "inject":  # flat up to Tok64's layer 2, then falling
                    a = 0.56 if row.x <= 2 else 0.56 - 0.05 * (row.x - 2)
                if row.ablation == "exit":  # within noise everywhere
                    a = 0.56
                a += w
                append_line(setup.results / f"{table}.jsonl", dict(
                    table=table, row=row.name, seed=seed, budget=setup.budget, accuracy=a,
                    per_type={"color": a}, mean_vision_tokens=10.0, flops_ratio=0.5))
    md = write_report(setup, tmp_path / "R.md", [0, 1, 2, 3]).read_text()
    verdict = {l.split("|")[1].strip(): l.split("|")[2].strip() for l in md.splitlines()
               if l.startswith("| ") and "**" in l}
    assert verdict["HiDrop Tok64 keeps 98.3% of vanilla"].startswith("**holds, but disagrees in direction")
    assert verdict["HiDrop Tok48 keeps 96.5% of vanilla"] == "**does not hold**"
    assert verdict["HiDrop beats PyramidDrop and FastV at equal mean tokens"] == "**holds**"
    assert verdict["the relaxed top-k beats a hard top-k (99.7% vs 97.7%)"] == "**does not hold**"
    assert verdict["persistent positions beat group and compacted (97.6 / 97.0 / 96.4%)"].startswith(
        "**cannot tell at this scale")
    assert verdict["moving to later injection costs little until a plateau ends"] == "**holds**"
    assert verdict["moving to earlier exit costs little until a plateau ends"].startswith("**cannot tell at this scale")
    rows = [l for l in md.split("## Accuracy")[0].splitlines() if l.startswith("| ") and "row |" not in l]
    assert len(rows) == len(setup.rows("methods")) + len(setup.rows("ablations")) and all(l.endswith("| done |") for l in rows)  # every row, 4 seeds


def test_other_budgets_sit_beside_this_one_with_their_own_vanilla_gap(tmp_path):
    """A row that also ran at twice the steps is listed seed by seed under both budgets, its gap
    taken against vanilla of the same budget (not this budget's vanilla); other configs stay out;
    the retention claim quotes that gap."""
    from experiments.report import write_report
    from experiments.run import Setup, append_line
    short, long_ = (Setup("configs/tiny_shapes.py", n, [], tmp_path) for n in (2, 4))
    acc = {(short, "vanilla"): 0.40, (short, "tok64"): 0.46, (long_, "vanilla"): 0.55, (long_, "tok64"): 0.52}
    for (setup, row), a in acc.items():
        append_line(setup.results / "methods.jsonl", dict(
            table="methods", row=row, seed=0, budget=setup.budget, steps=setup.steps, config=setup.config,
            sets=[], accuracy=a, per_type={"color": a}, mean_vision_tokens=10.0, flops_ratio=0.5))
    append_line(short.results / "methods.jsonl", dict(  # another config: not this report's
        table="methods", row="tok64", seed=0, budget="other-4", steps=4, config="configs/other.py",
        sets=[], accuracy=0.9, per_type={}, mean_vision_tokens=10.0, flops_ratio=0.5))
    md = write_report(short, tmp_path / "R.md", [0]).read_text()
    section = md.split("## Other budgets")[1]
    rows = {tuple(c.strip() for c in l.split("|")[1:6]) for l in section.splitlines() if l.startswith("| methods/")}
    assert rows == {("methods/tok64", "0", "2", "0.460", "+6.0"), ("methods/tok64", "0", "4", "0.520", "-3.0"),
                    ("methods/vanilla", "0", "2", "0.400", "+0.0"), ("methods/vanilla", "0", "4", "0.550", "+0.0")}
    # the retention verdict quotes the longer budget's gap beside its own evidence
    tok64_claim = next(l for l in md.splitlines() if l.startswith("| HiDrop Tok64 keeps"))
    assert "at 4 steps: tok64 − vanilla -3.0 points (1 seed" in tok64_claim


def test_scale_notes_tell_types_nobody_reads_from_types_only_vanilla_misses(tmp_path):
    """Vanilla at chance on colour and exist; Tok64 far above chance on colour only: colour is
    named as the source of Tok64's lead, exist as unable to separate the methods, shape (where
    vanilla reads the image) in neither list. A longer budget's colour figures (two seeds) are
    quoted beside colour, its mean per row."""
    from experiments.report import scale_notes
    from experiments.run import Setup, append_line, read_lines
    setup = Setup("configs/tiny_shapes.py", 2, [], tmp_path)
    types = dict(vanilla=dict(color=0.17, exist=0.50, shape=0.60), tok64=dict(color=0.40, exist=0.51, shape=0.62))
    for row, per_type in types.items():
        for seed, w in enumerate((0.004, -0.004, 0.0)):
            append_line(setup.results / "methods.jsonl", dict(
                table="methods", row=row, seed=seed, budget=setup.budget, accuracy=0.5,
                per_type={q: a + w for q, a in per_type.items()}))
    lines = read_lines(setup.results / "methods.jsonl")
    data = {"methods": {row: {"lines": {r["seed"]: r for r in lines if r["row"] == row}} for row in types}}
    longer = [dict(row=row, seed=seed, steps=6, per_type={"color": c + 0.02 * seed})
              for row, c in (("vanilla", 0.18), ("tok64", 0.60)) for seed in (0, 1)]
    note = scale_notes(data, longer)
    lead, nobody = note.split("every method stays at chance on ")
    assert "color (vanilla 0.17" in lead and "tok64 0.40" in lead and "exist" not in lead
    assert "tok64 0.40; at 6 steps: vanilla 0.19, tok64 0.61 (2 seeds))" in lead
    assert "at 6 steps" not in scale_notes(data)
    assert "(seeds: vanilla 2, tok64 1)" in scale_notes(data, longer[:3])  # unequal seed counts are named
    assert nobody.startswith("exist 0.50") and "color" not in nobody and "shape" not in note


def test_sigterm_to_the_runner_is_passed_on_and_it_exits_when_its_child_has(tmp_path):
    """The runner's SIGTERM handler forwards the signal and returns once the child is gone (it
    used to spin 120 s on the Popen lock its own interrupted wait held)."""
    driver = ("import signal, sys; from pathlib import Path; from experiments import run; "
              "signal.signal(signal.SIGTERM, run._on_term); "
              f"run.sh([sys.executable, '-c', 'import time; print(1, flush=True); time.sleep(300)'], Path({str(tmp_path)!r}) / 'log')")
    p = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT)
    log = tmp_path / "log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.is_file() and log.read_text().rstrip().endswith("1")):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    # a hang bound, not a timing: the child dies at once, the old handler spun for 120 s
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
