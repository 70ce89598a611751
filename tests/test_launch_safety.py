"""The launchers never launch by mistake (issue 15). Fake `gcloud`, `srun`, `ssh`, `scp`,
`sbatch` and `python` executables on PATH append their argv to a log, so each test sees every
command a launcher really ran:

* `--dry-run` at every position of the command line (before, among and after the launcher
  options, right before and after `--`, among and after the training arguments, as the value
  of an option) runs nothing;
* an unknown launcher option fails with one line naming it and listing the allowed ones;
  a launcher option among the training arguments fails too; neither reaches the trainer;
* slurm_gpu.sbatch refuses to run outside an allocation unless --allow-outside-allocation;
* real (faked) runs make the right calls in the right order, with the trainer's argv intact.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
FAKES = ["gcloud", "srun", "ssh", "scp", "sbatch", "python", "python3"]
TRAIN = ["--config", "configs/llava15_7b.py:schedule=tok64,dtype=bfloat16", "--workdir",
         "/shared/runs/x", "--config.train.mesh=(1,-1,1)", "--config.train.steps=5"]
# The launcher options of each script used below (values that cannot be mistaken for others).
OPTS = {
    "tpu_pod.sh": ["--name", "t1", "--zone", "z", "--create", "--accelerator-type", "v5p-64",
                   "--env", "K=V"],
    "local.sh": ["--procs", "2", "--cpu-devices", "2", "--port", "23456"],
    "slurm_gpu.sbatch": ["--env", "K=V", "--venv", "VENV"],
}
LAUNCHER_FLAGS = {  # every option of each launcher (from its --help)
    "tpu_pod.sh": ["--name", "--zone", "--project", "--create", "--accelerator-type", "--version",
                   "--spot", "--repo-url", "--ref", "--remote-dir", "--python", "--with-torch",
                   "--skip-setup", "--setup-only", "--env", "--detach", "--dry-run"],
    "local.sh": ["--procs", "--port", "--cpu-devices", "--logdir", "--python", "--dry-run"],
    "slurm_gpu.sbatch": ["--repo", "--venv", "--env-file", "--env", "--allow-outside-allocation",
                         "--dry-run"],
}


class Fakes:
    """A PATH whose fake executables log their calls (name + argv) to one file."""

    def __init__(self, tmp: Path):
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.log = tmp / "calls.log"
        for name in FAKES:
            p = self.bin / name
            # one printf per call: an O_APPEND write of one record, safe with parallel calls
            p.write_text('#!/usr/bin/env bash\nrec=$(basename "$0")\n'
                         'for a in "$@"; do rec+=$\'\\x1f\'"$a"; done\n'
                         f'printf \'%s\\x1e\' "$rec" >> {self.log}\n'
                         'for a in "$@"; do [[ -n ${FAKE_FAIL:-} && $a == "$FAKE_FAIL" ]] && exit 1; done\n'
                         'exit 0\n')
            p.chmod(0o755)
        self.venv = tmp / "venv"
        (self.venv / "bin").mkdir(parents=True)
        (self.venv / "bin" / "python").symlink_to(self.bin / "python")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env.update(PATH=f"{self.bin}:{os.environ['PATH']}", PYTHON=str(self.bin / "python"),
                        TMPDIR=str(tmp))

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [r.split("\x1f") for r in self.log.read_text().split("\x1e") if r]

    def run(self, script, *args, env=None):
        args = [str(self.venv) if a == "VENV" else a for a in args]
        return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                              text=True, env={**self.env, **(env or {})}, cwd=REPO, timeout=60)


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path)


def trainer_argvs(script, stdout):
    """The argv each printed command gives the trainer (after `-m hidrop_jax.train`)."""
    import shlex
    out = []
    for line in stdout.strip().splitlines():
        words = shlex.split(line)
        if script == "tpu_pod.sh" and "--command" in words:
            words = shlex.split(words[words.index("--command") + 1])
        if "hidrop_jax.train" in words:
            argv = words[words.index("hidrop_jax.train") + 1:]
            while argv and argv[-1] in ("&", "2>&1") or argv and argv[-1].startswith(">"):
                argv.pop()  # local.sh's redirections of processes > 0
            while len(argv) >= 2 and argv[-2] == ">":
                del argv[-2:]
            out.append(argv)
    return out


def dry_run_variants(script):
    """`--dry-run` inserted at every position, with and without `--` before TRAIN_ARGS."""
    for sep in (["--"], []):
        base = OPTS[script] + sep + TRAIN
        for i in range(len(base) + 1):
            yield base[:i] + ["--dry-run"] + base[i:]
    # the user's command from issue 15, and the value of a trainer flag
    yield OPTS[script] + TRAIN[:2] + ["--workdir", "--dry-run"]
    yield OPTS[script] + ["--", "--dry-run", "--", *TRAIN]


@pytest.mark.parametrize("script,inside", [(s, False) for s in OPTS] + [("slurm_gpu.sbatch", True)])
def test_dry_run_anywhere_runs_nothing(fakes, script, inside):
    env = {"SLURM_JOB_ID": "42"} if inside else {}
    n_ok = 0
    for args in dry_run_variants(script):
        p = fakes.run(script, *args, env=env)
        assert fakes.calls() == [], (args, fakes.calls())
        if p.returncode == 0:
            n_ok += 1
            argvs = trainer_argvs(script, p.stdout)
            assert argvs, (args, p.stdout)
            for argv in argvs:
                assert "--dry-run" not in argv, (args, argv)
                assert not set(argv) & set(LAUNCHER_FLAGS[script]), (args, argv)
        else:
            # --dry-run as the value of a launcher option: an error, one line naming the option
            assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
    assert n_ok >= 2 * len(TRAIN), script  # most positions are valid dry runs


def test_issue_15_command_is_a_dry_run(fakes):
    """The exact shape that called `gcloud ... create` for real."""
    p = fakes.run("tpu_pod.sh", "--name", "t1", "--zone", "z", "--create", "--accelerator-type",
                  "v5p-64", "--config", "configs/tiny_shapes.py", "--workdir", "/w", "--dry-run")
    assert p.returncode == 0 and fakes.calls() == []
    assert p.stdout.startswith("gcloud compute tpus tpu-vm create t1")
    assert trainer_argvs("tpu_pod.sh", p.stdout) == [
        ["--distributed", "--config", "configs/tiny_shapes.py", "--workdir", "/w"]]


@pytest.mark.parametrize("script", list(OPTS))
def test_help_anywhere_runs_nothing(fakes, script):
    for args in (["--help"], [*OPTS[script], "--", *TRAIN, "--help"], [*TRAIN, "-h"]):
        p = fakes.run(script, *args)
        assert p.returncode == 0 and "Usage:" in p.stdout and "--dry-run" in p.stdout, args
        assert "launcher options never reach the trainer" in p.stdout
    assert fakes.calls() == []


@pytest.mark.parametrize("script", list(OPTS))
def test_unknown_and_misplaced_options_fail(fakes, script):
    env = {"SLURM_JOB_ID": "42"}
    typo = {"tpu_pod.sh": "--zon", "local.sh": "--proc", "slurm_gpu.sbatch": "--venv-dir"}[script]
    for args, named in [
        ([typo, "x", *TRAIN], typo),
        ([*OPTS[script], "--bogus", *TRAIN], "--bogus"),
        ([*OPTS[script], "--bogus=1", "--", *TRAIN], "--bogus"),
        ([*OPTS[script], "stray", *TRAIN], "'stray'"),
        ([*OPTS[script], *TRAIN, OPTS[script][0], OPTS[script][1]], OPTS[script][0]),
        ([*OPTS[script], "--", *TRAIN[:2], LAUNCHER_FLAGS[script][-2], *TRAIN[2:]],
         LAUNCHER_FLAGS[script][-2]),
        ([*OPTS[script], "--dry-run=yes", *TRAIN], "--dry-run"),
    ]:
        p = fakes.run(script, *args, env=env)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (args, p.stderr)
        assert named in lines[0], (args, lines)
        if "unknown" in lines[0] or "unexpected" in lines[0]:
            for flag in LAUNCHER_FLAGS[script]:  # the allowed options are listed
                assert flag in lines[0], (flag, lines[0])
    assert fakes.calls() == []


def test_slurm_refuses_outside_allocation(fakes):
    p = fakes.run("slurm_gpu.sbatch", "--venv", "VENV", "--", *TRAIN)
    (line,) = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "SLURM_JOB_ID" in line and "--allow-outside-allocation" in line
    assert fakes.calls() == []
    # told to: srun makes its own allocation
    p = fakes.run("slurm_gpu.sbatch", "--allow-outside-allocation", "--venv", "VENV", "--", *TRAIN)
    assert p.returncode == 0, p.stderr
    (call,) = fakes.calls()
    assert call[0] == "srun"


def test_slurm_real_run_calls_srun_once(fakes):
    p = fakes.run("slurm_gpu.sbatch", *OPTS["slurm_gpu.sbatch"], *TRAIN,
                  env={"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"})
    assert p.returncode == 0, p.stderr
    (call,) = fakes.calls()
    assert call[:4] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"]
    j = call.index("-m")
    assert call[j - 1] == f"{fakes.venv}/bin/python" and "K=V" in call[:j]
    assert call[j + 1:] == ["hidrop_jax.train", *TRAIN]


def test_local_real_run(fakes):
    p = fakes.run("local.sh", *TRAIN)
    assert p.returncode == 0, p.stderr
    assert fakes.calls() == [["python", "-m", "hidrop_jax.train", *TRAIN]]
    fakes.log.unlink()
    p = fakes.run("local.sh", *OPTS["local.sh"], "--logdir", str(fakes.bin.parent / "logs"), *TRAIN)
    assert p.returncode == 0, p.stderr
    calls = sorted(fakes.calls())
    assert [c[:len(TRAIN) + 3] for c in calls] == [["python", "-m", "hidrop_jax.train", *TRAIN]] * 2
    assert [c[len(TRAIN) + 3:] for c in calls] == [
        ["--coordinator=127.0.0.1:23456", "--num_processes=2", f"--process_id={i}"] for i in (0, 1)]


def test_tpu_pod_real_run_order_and_stop_on_failure(fakes):
    p = fakes.run("tpu_pod.sh", *OPTS["tpu_pod.sh"], "--", *TRAIN)
    assert p.returncode == 0, p.stderr
    calls = fakes.calls()
    assert [c[:6] for c in calls] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(fakes.bin.parent / "hidrop_src_t1.tar.gz")],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"],  # unpack
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"],  # install
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"],  # train
    ]
    assert (fakes.bin.parent / "hidrop_src_t1.tar.gz").stat().st_size > 0  # git archive ran
    commands = [c[c.index("--command") + 1] for c in calls[2:]]
    assert "tar -xzf" in commands[0] and "pip install" in commands[1]
    import shlex
    words = shlex.split(commands[2])
    assert words[-len(TRAIN) - 1:] == ["--distributed", *TRAIN] and "K=V" in words

    # a failing step stops the launch: nothing after `create`
    fakes.log.unlink()
    p = fakes.run("tpu_pod.sh", *OPTS["tpu_pod.sh"], "--", *TRAIN, env={"FAKE_FAIL": "create"})
    assert p.returncode != 0 and [c[4] for c in fakes.calls()] == ["create"]


def test_slurm_keeps_an_identical_copy_of_common_sh():
    block = re.compile(r"# --- shared launcher helpers: begin\n.*# --- shared launcher helpers: end\n",
                       re.S)
    (common,) = block.findall((LAUNCH / "common.sh").read_text())
    (copy,) = block.findall((LAUNCH / "slurm_gpu.sbatch").read_text())
    assert copy == common


def test_train_flags_match_the_trainer():
    """TRAIN_FLAGS (where TRAIN_ARGS start without `--`) lists exactly train.py's flags."""
    src = (REPO / "hidrop_jax" / "train.py").read_text()
    defs = re.findall(r"DEFINE_(\w+)\(\s*\"(\w+)\"", src)
    expected = {f"--{n}" for _, n in defs} | {f"--no{n}" for k, n in defs if k == "bool"}
    out = subprocess.run(["bash", "-c", f'source {LAUNCH}/common.sh; printf "%s\\n" "${{TRAIN_FLAGS[@]}}"'],
                         capture_output=True, text=True, check=True).stdout.split()
    assert set(out) == expected and "--config" in expected
