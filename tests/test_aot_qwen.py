"""Ahead-of-time compilation of Qwen2.5-VL programs for a TPU slice (`hidrop_jax.aot`, libtpu).

What could fail: the abstract batch lacks Qwen's patches or M-RoPE rows (the program would not
trace), the vision tower's window permutation and its inverse do not lower for TPU, the
analytic FLOPs crash on a config without CLIP's fields, or the report drops a field.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="libtpu is not installed (pip install -e .[tpu]): no TPU compiler"),
              pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_shapes_qwen.py")
ENV = dict(os.environ, TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
SMALL = ["--config.model.text.num_layers=4", "--config.train.batch_size=4",
         "--config.train.mesh=(1,-1,1)"]


def test_train_program_compiles_for_v5p(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "hidrop_jax.aot", "--config", f"{CONFIG}:schedule=tok64",
                        "--topology", "v5p:2x2x1", "--program", "train", "--flops=none", *SMALL,
                        "--out", str(out)], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["topology"], r["chip"], r["devices"], r["program"], r["schedule"]) == \
        ("v5p:2x2x1", "v5p", 4, "train", "tok64")
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["batch_per_device"] == 1
    m = r["bytes_per_device"]
    assert r["fits"] and 0 < m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
    assert 0 < m["alias"] <= min(m["argument"], m["output"])  # the donated train state
    assert r["model_flops_per_device"] > 0


def test_prefill_program_compiles_with_xla_flops_near_the_analytic_count():
    """XLA's FLOPs of the unrolled prefill (counted on this host, `aot`'s default) and the
    analytic count (tower, merger, LLM under the schedule, head) agree within 25 % (XLA adds
    softmax, norms, rotations; the analytic count adds full rather than causal attention)."""
    sys.path.insert(0, ROOT)
    from hidrop_jax import aot
    from hidrop_jax.config import load_config
    cfg = load_config(f"{CONFIG}:schedule=tok64")
    cfg.model.text.num_layers = 4
    cfg.train.update(batch_size=4, mesh=(1, -1, 1))
    r = aot.run(cfg, "v5p:2x2x1", "prefill")
    assert r["fits"] and r["flops_per_device"] > 0
    assert r["flops_per_device"] == pytest.approx(r["model_flops_per_device"], rel=0.25)
