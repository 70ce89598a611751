"""Issue 19's tables, one command each: train, evaluate on the test split, append a JSON line.

    python experiments/run.py --table methods   [--seeds 0,1,2] [--steps N] [--rows a,b] [--jobs 1]
    python experiments/run.py --table ablations [--seeds 0,1,2] [--steps N] [--rows a,b] [--jobs 1]
    python experiments/run.py --report [--steps N]          # RESULTS.md + results/pareto.png

Every (table, row, seed) is one unit: train the row's schedule for `--steps` steps with
`train.seed = seed` (the same initialisation and data order for every row), evaluate it on the
**test** split (`python -m hidrop_jax.evaluate --split test`; validation is only read by
`analyze` to choose a schedule), and append one line to `results/<table>.jsonl`: accuracy overall
and per question type, vision tokens per layer, the paper's FLOPs ratio and the measured
train-step time ratio to vanilla (a separate timing pass, `experiments/timing.py`, all schedules
side by side in one process).

Safe to stop and restart at any point, also from a later session: a unit whose line exists is
never redone; a training workdir that holds checkpoints resumes from its last one (the trainer
does that); finished trainings (final checkpoint present), evaluations and analyses are reused.
Each unit and each training workdir is held under a file lock, so two runners never do the same
work. Children get SIGTERM when the runner dies (the trainer then saves its current step);
SIGTERM to the runner is passed on. Seeds are the outer loop: seed 0 of every row finishes
before seed 1 starts. Logs: runs/<budget>/<schedule>/seed<k>/train.log.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.tables import TABLES, Row, apply_sets, rows as table_rows, train_key  # noqa: E402

DEFAULT_CONFIG = "configs/tiny_shapes.py"
# The budget of every row (see RESULTS.md "Budget"): one seed of the methods table fits in ~2 h
# of an otherwise idle 2-core machine.
from experiments.report import DEFAULT_STEPS  # noqa: E402  (the reason is written in RESULTS.md)
DEFAULT_SEEDS = (0, 1, 2)
PY = sys.executable


# ----------------------------------------------------------------------------- configuration

class Setup:
    """What every unit of one invocation shares: config, budget, paths."""

    def __init__(self, config: str, steps: int, sets: list, root: Path, timing_repeats: int = 10):
        from hidrop_jax.config import load_config, n_vision_tokens
        self.config, self.steps, self.sets = config, steps, list(sets)
        self.root, self.timing_repeats = Path(root).absolute(), timing_repeats
        cfg = load_config(str(ROOT / config) if not Path(config).is_absolute() else config)
        apply_sets(cfg, self.sets)  # to know the model, data spec and warmup the runs will see
        self.num_layers, self.n_vision = cfg.model.text.num_layers, n_vision_tokens(cfg.model)
        self.data_name, self.warmup = cfg.data.name, cfg.train.warmup_steps
        self.width, self.mlp = cfg.model.text.hidden_size, cfg.model.text.intermediate_size
        self.batch = cfg.train.batch_size
        tag = f"{Path(config.partition(':')[0]).stem}-{steps}"
        if self.sets:
            tag += "-" + hashlib.sha1("\n".join(sorted(self.sets)).encode()).hexdigest()[:8]
        self.budget = tag
        self.runs = self.root / "runs" / tag
        self.results = self.root / "results"

    def rows(self, table: str) -> list[Row]:
        return table_rows(table, self.num_layers, self.n_vision)

    def workdir(self, key: str, seed: int) -> Path:
        return self.runs / key / f"seed{seed}"

    def train_flags(self, fields: dict, seed: int) -> list:
        f = dict(fields)
        name = f.pop("name")
        out = [f"--config={self.config}:schedule={name}", f"--config.train.steps={self.steps}",
               f"--config.train.seed={seed}"]
        if self.warmup >= self.steps:
            out.append(f"--config.train.warmup_steps={self.steps // 10}")
        for k, v in f.items():
            if isinstance(v, (tuple, list)):
                v = "(" + ",".join(map(str, v)) + ("," if len(v) == 1 else "") + ")"
            out.append(f"--config.hidrop.{k}={v}")
        return out + [f"--config.{s}" for s in self.sets]


# ----------------------------------------------------------------------------- processes & locks

_children: set = set()


def _die_with_parent():  # runs in the child before exec: SIGTERM when the runner dies
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def sh(cmd: list, log: Path) -> int:
    """Runs `cmd` with its output appended to `log`; returns its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"\n### {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n")
        fh.flush()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # the child inherits this thread's lock files: a lock outlives a killed runner until
        # its orphaned child (told by SIGTERM) has saved and exited
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                             preexec_fn=_die_with_parent, pass_fds=tuple(_held_fds()))
        _children.add(p)
        try:
            return p.wait()
        finally:
            _children.discard(p)


def _on_term(signum, frame):
    for p in list(_children):
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    # Not p.wait(): the interrupted main thread holds that Popen's wait lock, so it would spin
    # until its timeout. Reap with waitpid directly (another thread's wait then sees ECHILD).
    deadline = time.time() + 120
    for p in list(_children):
        with contextlib.suppress(ChildProcessError):
            while not os.waitpid(p.pid, os.WNOHANG)[0] and time.time() < deadline:
                time.sleep(0.1)
    os._exit(128 + signum)


_local = threading.local()


def _held_fds() -> list:
    return list(getattr(_local, "fds", []))


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock held while the block runs (waits for another runner to finish)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _local.fds = _held_fds() + [fh.fileno()]
        try:
            yield
        finally:
            _local.fds.remove(fh.fileno())
            fcntl.flock(fh, fcntl.LOCK_UN)


class UnitFailed(RuntimeError):
    pass


# ----------------------------------------------------------------------------- results

def read_lines(path: Path) -> list:
    """The JSON lines of a results file (a torn last line, from a kill mid-write, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def has_result(setup: Setup, table: str, row: str, seed: int) -> bool:
    return any(r.get("row") == row and r.get("seed") == seed and r.get("budget") == setup.budget
               for r in read_lines(setup.results / f"{table}.jsonl"))


def same_run_result(setup: Setup, fields: dict, seed: int):
    """A finished line, in any table, of a row that trained `fields` under this budget and seed
    and was evaluated as trained: such rows are one model (same schedule, initialisation and
    data order), so its result stands for another row's, even after `runs/` is gone."""
    want = json.loads(json.dumps(fields))
    for table in TABLES:
        for r in read_lines(setup.results / f"{table}.jsonl"):
            if (r.get("budget") == setup.budget and r.get("seed") == seed and r.get("sets") == setup.sets
                    and r.get("trained_schedule") == want and r.get("training_free") is False
                    and "accuracy" in r and "proposal" not in r and "same_as" not in r):
                return r
    return None


def append_line(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        # a line torn by an earlier kill must not swallow this one
        if fh.tell() and not path.read_bytes().endswith(b"\n"):
            fh.write("\n")
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- steps of a unit

def trained(setup: Setup, workdir: Path) -> bool:
    return (workdir / "checkpoints" / str(setup.steps)).is_dir()


def ensure_trained(setup: Setup, workdir: Path, fields: dict, seed: int) -> float:
    """Trains (or resumes) `workdir` to the budget; returns the seconds spent here."""
    with locked(workdir.parent / f"{workdir.name}.lock"):
        if trained(setup, workdir):
            return 0.0
        t0 = time.time()
        print(f"  train {workdir.relative_to(setup.root)} ({fields})", flush=True)
        rc = sh([PY, "-m", "hidrop_jax.train", f"--workdir={workdir}", *setup.train_flags(fields, seed)],
                workdir / "train.log")
        if rc != 0 or not trained(setup, workdir):
            raise UnitFailed(f"training {workdir} exited with {rc}; see {workdir / 'train.log'}")
        with open(workdir / "train_seconds.txt", "a") as fh:
            fh.write(f"{time.time() - t0:.1f}\n")
        return time.time() - t0


def ensure_eval(setup: Setup, workdir: Path, schedule: str, tag: str) -> dict:
    """Test-split evaluation of `workdir`'s final step (under `schedule` when given), cached."""
    out = workdir / f"eval_test{tag}.json"
    with locked(workdir.parent / f"{workdir.name}.lock"):
        if out.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(out.read_text())
        tmp = workdir / f"eval_test{tag}.partial.json"
        cmd = [PY, "-m", "hidrop_jax.evaluate", f"--workdir={workdir}", "--split=test",
               f"--step={setup.steps}", f"--out={tmp}"] + ([f"--schedule={schedule}"] if schedule else [])
        t0 = time.time()
        rc = sh(cmd, workdir / "eval.log")
        if rc != 0 or not tmp.is_file():
            raise UnitFailed(f"evaluating {workdir} ({schedule or 'as trained'}) exited with {rc}; "
                             f"see {workdir / 'eval.log'}")
        res = json.loads(tmp.read_text())
        res["eval_seconds"] = round(time.time() - t0, 1)
        _write_json(out, res)
        tmp.unlink()
        return res


def analysis_budget(setup: Setup) -> float:
    from hidrop_jax.hidrop.schedule import preset
    return round(preset("tok64", setup.num_layers, setup.n_vision).mean_tokens(), 2)


SCHEDULE_FIELDS = ("inject_layer", "prune_after", "keep", "exit_layer")


def _proposal_fields(path: Path) -> dict:
    d = json.loads(path.read_text())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in SCHEDULE_FIELDS}


def ensure_proposal(setup: Setup, workdir: Path) -> dict:
    """analyze's proposal for the model in `workdir` (validation split), as schedule fields;
    {"error": ...} when analyze finds none (recorded: it would find none again)."""
    out = workdir / "analysis"
    with locked(workdir.parent / f"{workdir.name}.lock"):
        if not (out / "schedule.json").is_file() and not (out / "failed.json").is_file():
            L = setup.num_layers
            rc = sh([PY, "-m", "hidrop_jax.analyze", f"--workdir={workdir}",
                     f"--data={setup.data_name}:validation", "--samples=256", f"--out={out}",
                     f"--budget={analysis_budget(setup)}", f"--ilvas-n={max(1, L // 4)},{max(2, L // 2)}"],
                    workdir / "analyze.log")
            report = out / "report.json"
            if not (out / "schedule.json").is_file():
                err = json.loads(report.read_text()).get("proposal", {}).get("error") if report.is_file() else None
                if rc != 2 or not err:
                    raise UnitFailed(f"analyze on {workdir} exited with {rc}; see {workdir / 'analyze.log'}")
                _write_json(out / "failed.json", {"error": err})
        if (out / "failed.json").is_file():
            return json.loads((out / "failed.json").read_text())
        return _proposal_fields(out / "schedule.json")


# ----------------------------------------------------------------------------- timing

def timing_ratio(setup: Setup, key: str, fields: dict) -> dict | None:
    """The latest timing pass that measured `key` (same config and extra settings)."""
    for rec in reversed(read_lines(setup.results / "timing.jsonl")):
        if rec.get("setup") == _timing_setup(setup) and key in rec.get("ratio", {}):
            return dict(ratio=rec["ratio"][key], step_s=rec["step_s"][key],
                        vanilla_step_s=rec["step_s"]["vanilla"], measured=rec["time"])
    return None


def _timing_setup(setup: Setup) -> str:
    return setup.config + "|" + ",".join(sorted(setup.sets))


def ensure_timing(setup: Setup, schedules: dict) -> None:
    """One side-by-side timing pass over the schedules ({key: fields}) not measured yet."""
    todo = {k: f for k, f in schedules.items() if timing_ratio(setup, k, f) is None}
    if not todo:
        return
    with locked(setup.runs / "timing.lock"):
        todo = {k: f for k, f in todo.items() if timing_ratio(setup, k, f) is None}
        if not todo:
            return
        print(f"  timing pass: {', '.join(todo)}", flush=True)
        tmp = setup.runs / f"timing-{os.getpid()}.json"
        rc = sh([PY, str(HERE / "timing.py"), f"--config={setup.config}", "--schedules", json.dumps(todo),
                 *[f"--set={x}" for x in setup.sets],
                 f"--repeats={setup.timing_repeats}", f"--out={tmp}"], setup.runs / "timing.log")
        if rc != 0:
            raise UnitFailed(f"timing pass exited with {rc}; see {setup.runs / 'timing.log'}")
        rec = json.loads(tmp.read_text())
        rec["setup"] = _timing_setup(setup)
        append_line(setup.results / "timing.jsonl", rec)
        tmp.unlink()


# ----------------------------------------------------------------------------- a unit

def run_unit(setup: Setup, table: str, row: Row, seed: int) -> str:
    """Does (table, row, seed) unless its line exists; returns what happened."""
    from hidrop_jax.hidrop.schedule import preset, vision_flops
    results = setup.results / f"{table}.jsonl"
    if has_result(setup, table, row.name, seed):
        return "done before"
    with locked(setup.runs / ".locks" / f"{table}.{row.name}.{seed}.lock"):
        if has_result(setup, table, row.name, seed):
            return "done before"
        t0 = time.time()
        by_name = {r.name: r for r in setup.rows("methods")}
        extra, eval_schedule, tag = {}, "", ""
        if row.train is not None:
            fields = row.train
        else:
            base = by_name[row.base]
            fields = base.train
            if row.evaluate:
                eval_schedule, tag = row.evaluate, f"_{row.evaluate}"
            if row.from_proposal or row.evaluate == "proposal":
                wd = setup.workdir(train_key(base.train), seed)
                ensure_trained(setup, wd, base.train, seed)
                prop = ensure_proposal(setup, wd)
                if "error" in prop:  # recorded: analyze would find none again
                    append_line(results, dict(
                        table=table, row=row.name, seed=seed, budget=setup.budget, steps=setup.steps,
                        label=row.label, error=f"analyze proposed no schedule: {prop['error']}",
                        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
                    return "no proposal"
                extra["proposal"] = {k: list(v) if isinstance(v, tuple) else v for k, v in prop.items()}
                if row.from_proposal:
                    fields = {"name": "vanilla", **prop}
                else:
                    eval_schedule = str(wd / "analysis" / "schedule.json")
        same = same_run_result(setup, fields, seed) if row.train is not None else None
        if same is not None:
            append_line(results, dict(
                same, table=table, row=row.name, label=row.label, same_as=f"{same['table']}/{same['row']}",
                unit_seconds=round(time.time() - t0, 1), commit=_commit(),
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
            return f"the same model as {same['table']}/{same['row']}: accuracy {same['accuracy']:.4f}"
        key = "proposal" if row.from_proposal else train_key(fields)
        wd = setup.workdir(key, seed)
        train_s = ensure_trained(setup, wd, fields, seed)
        res = ensure_eval(setup, wd, eval_schedule, tag)
        tkey = f"proposal_seed{seed}" if row.from_proposal else train_key(fields)
        ensure_timing(setup, {tkey: fields})
        timing = timing_ratio(setup, tkey, fields)
        s_eval = preset("vanilla", setup.num_layers, setup.n_vision,
                        **{k: tuple(v) if isinstance(v, list) else v for k, v in res["schedule"].items()
                           if k in ("inject_layer", "prune_after", "keep", "exit_layer", "selection",
                                    "positions", "temperature")})
        van = preset("vanilla", setup.num_layers, setup.n_vision)
        d, m = setup.width, setup.mlp
        rec = dict(
            table=table, row=row.name, seed=seed, budget=setup.budget, steps=setup.steps,
            config=setup.config, sets=setup.sets, label=row.label, workdir=str(wd.relative_to(setup.root)),
            trained_schedule=fields, training_free=row.train is None and not row.from_proposal,
            evaluated_schedule=res["schedule"], split=res["split"], step=res["step"],
            accuracy=res["accuracy"], rounds=res["rounds"],
            per_type={k: v["accuracy"] for k, v in res["per_type"].items()},
            per_type_rounds={k: v["rounds"] for k, v in res["per_type"].items()},
            vision_tokens_per_layer=res["vision_tokens_per_layer"],
            mean_vision_tokens=res["mean_vision_tokens"],
            flops_ratio=vision_flops(s_eval, d, m) / vision_flops(van, d, m),
            train_step_ratio=None if timing is None else timing["ratio"],
            train_step_s=None if timing is None else timing["step_s"],
            timing_measured=None if timing is None else timing["measured"],
            train_seconds=_train_seconds(wd), train_seconds_this_call=round(train_s, 1),
            eval_seconds=res.get("eval_seconds"),
            unit_seconds=round(time.time() - t0, 1), commit=_commit(),
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra)
        append_line(results, rec)
        return f"accuracy {rec['accuracy']:.4f}"


def _train_seconds(workdir: Path):
    """Wall seconds of the training calls that finished the run (an interrupted call's time is
    not recorded); the machine is shared, so this is no speed measure (see the timing pass)."""
    f = workdir / "train_seconds.txt"
    return round(sum(float(x) for x in f.read_text().split()), 1) if f.is_file() else None


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip()


def run_table(setup: Setup, table: str, seeds, only=None, jobs: int = 1, timing_only: bool = False) -> None:
    rows = setup.rows(table)
    if only:
        unknown = sorted(set(only) - {r.name for r in rows})
        if unknown:
            raise SystemExit(f"error: --rows {','.join(unknown)} not in table {table}; allowed: "
                             f"{','.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in only]
    # the static schedules' timing first, all in one process (side by side)
    ensure_timing(setup, {train_key(r.train): r.train for r in rows if r.train is not None}
                  | ({"vanilla": {"name": "vanilla"}} if any(r.base for r in rows) else {}))
    if timing_only:
        return
    units = [(r, s) for s in seeds for r in rows]

    def one(u):
        r, s = u
        try:
            msg = run_unit(setup, table, r, s)
        except UnitFailed as e:
            msg = f"FAILED: {e}"
        print(f"[{time.strftime('%H:%M:%S')}] {table}/{r.name}/seed{s}: {msg}", flush=True)
        return msg

    if jobs <= 1:
        msgs = [one(u) for u in units]
    else:
        with ThreadPoolExecutor(jobs) as ex:
            msgs = list(ex.map(one, units))
    failed = sum(m.startswith("FAILED") for m in msgs)
    print(f"{table}: {len(units) - failed}/{len(units)} units done" + (f", {failed} failed" if failed else ""))
    if failed:
        raise SystemExit(1)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python experiments/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", choices=TABLES)
    what.add_argument("--report", action="store_true", help="write RESULTS.md from the JSON lines")
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps of every row")
    ap.add_argument("--rows", default="", help="only these rows (comma-separated)")
    ap.add_argument("--jobs", type=int, default=1, help="units run at once (2 cores: 1)")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="config file (relative to the repo)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an extra --config.FIELD=VALUE for every training run (part of the budget tag)")
    ap.add_argument("--root", default=str(HERE), help="where runs/ and results/ live")
    ap.add_argument("--timing-repeats", type=int, default=10)
    ap.add_argument("--timing-only", action="store_true", help="only the table's timing pass")
    ap.add_argument("--out", default=str(ROOT / "RESULTS.md"), help="--report: the Markdown file")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    setup = Setup(a.config, a.steps, a.set, Path(a.root), a.timing_repeats)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if a.report:
        from experiments.report import write_report
        write_report(setup, Path(a.out), seeds)
        return
    print(f"{a.table}: budget {setup.budget} ({a.steps} steps), seeds {seeds}; runs in {setup.runs}",
          flush=True)
    run_table(setup, a.table, seeds, [r for r in a.rows.split(",") if r] or None, a.jobs,
              timing_only=a.timing_only)


if __name__ == "__main__":
    main()
