"""`make demo`'s command, end to end on a small dataset and 2 steps: the dataset, training,
evaluation under the trained schedule and vanilla, the export, and both PyTorch evaluations
(vanilla LLaVA and the export's own HiDrop code) agree with JAX on the same answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HIDROP_DATA_DIR=str(tmp_path / "data"))
    r = subprocess.run([sys.executable, "-m", "hidrop_jax.demo", "--steps", "2", "--eval-batches", "1",
                        "--data", "shapes_vqa:train=64,validation=16,test=16",
                        "--workdir", str(tmp_path / "demo")], env=env, capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    jax_tok64, jax_vanilla = report["eval"]["tok64"], report["eval"]["vanilla"]
    assert jax_tok64["rounds"] == jax_vanilla["rounds"] == report["torch_vanilla"]["rounds"] \
        == report["torch_hidrop"]["rounds"] > 0
    # PyTorch agrees with JAX answer by answer: plain LLaVA with vanilla, the export's code with Tok64
    assert report["torch_vanilla"]["per_type"] == jax_vanilla["per_type"]
    assert report["torch_hidrop"]["per_type"] == jax_tok64["per_type"]
    assert 0 < report["vision_flops_ratio"] < 0.25
    for row in ("JAX tok64", "JAX vanilla", "PyTorch export, vanilla", "PyTorch export, tok64"):
        assert row in r.stdout, (row, r.stdout[-2000:])
