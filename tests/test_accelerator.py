"""`benchmarks/accelerator.py`, the one run a lent GPU or TPU gets (minutes of a scarce budget):
it must not first meet a bug there. Run here as on a device, at its CPU smoke sizes.

What could fail: a section crashes instead of skipping what the platform lacks; the Pallas
kernel (interpret mode) or PyTorch's LLaVA on the same weights disagree with our XLA logits;
a schedule's row loses a figure; the time budget does not stop schedules it cannot afford, or
stops the baseline; a size the user gave is replaced by the smoke sizes; a misspelt schedule
is found only after the minutes of setup.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")


def test_the_device_run_on_a_cpu_checks_parity_and_skips_what_it_lacks(tmp_path):
    out = tmp_path / "acc.json"
    # budget 1 s: vanilla always runs (the baseline), then tok64 would end past the budget
    p = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--small", "--schedules", "vanilla,tok64",
                        "--repeats", "1", "--budget-s", "1", "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["platform"] == "cpu" and "nothing to compare" in r["parity"]["skipped"]
    assert r["small"] and r["repeats"] == 1 and r["layers"] == 4  # given / the smoke default
    fused = r["fused_attention"]["vs_xla"]
    assert fused["rel_to_max"] < 1e-5 and fused["argmax_agree"] == 1.0
    ours_vs_torch = r["torch"]["prefill_logits_vs_ours"]
    assert ours_vs_torch["rel_to_max"] < 1e-5 and ours_vs_torch["argmax_agree"] == 1.0
    assert r["torch"]["prefill_s"] > 0 and r["torch"]["decode_tokens_per_s"] > 0
    vanilla, tok64 = r["schedules"]
    assert vanilla["schedule"] == "vanilla" and vanilla["mean_vision_tokens"] == 576
    assert all(vanilla[k] > 0 for k in ("train_step_s", "train_tokens_per_s", "prefill_s", "decode_tokens_per_s"))
    assert tok64["schedule"] == "tok64" and tok64["skipped"].startswith("budget:")
    assert "| vanilla | 576 |" in p.stdout


def test_a_misspelt_schedule_stops_the_run_before_anything_runs(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--schedules", "vanilla,tok46",
                        "--out", str(tmp_path / "acc.json")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "--schedules 'vanilla,tok46'" in p.stderr and "allowed: vanilla" in p.stderr
    assert not (tmp_path / "acc.json").exists() and "1. parity" not in p.stdout
