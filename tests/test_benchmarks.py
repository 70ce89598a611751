"""The benchmarks BENCHMARKS.md gives commands for, run as documented at small sizes.

What could fail: a documented command no longer runs; a schedule's row loses a figure or its
mean vision tokens (the paper's: vanilla 576, Tok64 64 on 32 layers); a decode rate whose two
timings are inside the timer's noise comes out as a number (it did: 1e9 tokens/s); the
committed demo tower no longer says where its patches are (RESULTS.md relies on it); the
memory-scaling benchmark compiles one attention and labels it another (it did: `--attention
xla` compiled the Pallas kernel once that became the TPU default).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
sys.path.insert(0, ROOT)


def _run(*args, timeout=900):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_decode_rate_is_none_when_the_timer_cannot_resolve_it():
    from benchmarks import speed
    assert speed.decode_rate(1.0, 1.3, 4) == pytest.approx(10.0)
    assert speed.decode_rate(1.0, 0.98, 4) is None and speed.decode_rate(1.0, 1.0, 4) is None
    assert speed.rate(None) == "—" and speed.rate(12.345) == "12.3"


def test_speed_side_by_side(tmp_path):
    out = tmp_path / "speed.json"
    stdout = _run("benchmarks/speed.py", "--schedules", "vanilla,tok64", "--repeats", "1", "--width", "64",
                  "--text-len", "16", "--new-tokens", "4", "--no-torch", "--out", str(out))
    vanilla, tok64 = json.loads(out.read_text())["schedules"]
    assert (vanilla["schedule"], vanilla["mean_vision_tokens"]) == ("vanilla", 576)
    assert (tok64["schedule"], tok64["mean_vision_tokens"]) == ("tok64", 64)
    for r in (vanilla, tok64):
        assert all(r[k] > 0 for k in ("train_step_s", "grad_s", "prefill_s", "prefill_serial_s", "peak_memory_mib"))
        assert r["decode_tokens_per_s"] is None or r["decode_tokens_per_s"] > 0
    assert tok64["predicted_macs"] < vanilla["predicted_macs"]
    assert stdout.count("| tok64 |") == 2  # training and inference tables


def test_attention_probe_and_the_committed_towers_positions(tmp_path):
    out = tmp_path / "ap.json"
    _run("benchmarks/attention_probe.py", "--stds", "0.0884", "--steps", "50", "--images", "64", "--out", str(out))
    r = json.loads(out.read_text())
    assert [(x["find_by"], x["answer"]) for x in r["rows"]] == [("kind", "colour"), ("color", "kind")]
    assert all(0 <= acc <= 1 for x in r["rows"] for acc in x["accuracy"].values()) and r["rows"][0]["accuracy"]
    assert r["position_r2"]["row"] > 0.9 and r["position_r2"]["column"] > 0.9


def test_vision_probe_trains_and_scores_a_tower(tmp_path):
    out = tmp_path / "vp.json"
    _run("benchmarks/vision_probe.py", "--towers", "mlp256", "--steps", "10", "--eval-every", "5", "--out", str(out))
    [r] = json.loads(out.read_text())["results"]
    assert r["tower"] == "mlp256" and [c["step"] for c in r["curve"]] == [5, 10]
    assert all(0 <= c[k] <= 1 for c in r["curve"] for k in ("kind_acc", "color_acc"))


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_memory_scaling_compiles_the_attention_it_names(monkeypatch, tmp_path, attention):
    """Each case is a 7B-width compile of minutes: here `aot.run` only records what it was given."""
    from benchmarks import aot_memory_scaling as ams
    from hidrop_jax.layers.attention import resolve
    seen = []

    def run(cfg, topology, program, **_):
        seen.append(resolve(cfg.model.attention_impl, "tpu"))
        return dict(topology=topology, schedule=cfg.hidrop.name, attention_impl=seen[-1], compile_s=1.0,
                    bytes_per_device=None)
    monkeypatch.setattr(ams.aot, "run", run)
    out = str(tmp_path / "rows.jsonl")
    ams.measure([(4, 1)], ["vanilla"], "v5p:2x2x1", out, attention)
    ams.measure([(4, 1)], ["vanilla"], "v5p:2x2x1", out, attention)  # done: not compiled again
    assert seen == [attention]
    assert f"| v5p:2x2x1 | vanilla | {attention} | 4 | 1 |" in ams.table(out)
