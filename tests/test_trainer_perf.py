"""Trainer figures (issue 16): the analytic FLOP count against XLA's, the per-step
tokens/s, TFLOP/s and MFU a run logs, and the `train.profile_steps` trace.

The expected counts here are written out by hand from the layer shapes, independent of
`hidrop_jax.perf`; tests/test_flops.py checks the paper's per-layer formula against XLA.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

import tiny_config
from hidrop_jax import perf
from hidrop_jax import train as train_lib
from hidrop_jax.config import make_config, model_config, schedule_of, validate_train, with_schedule
from hidrop_jax.model import abstract_params

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmarks_flops_tp", ROOT / "benchmarks" / "flops.py")
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


# ----------------------------------------------------------------------------- (a) the count vs XLA

def _gqa_config():
    """Grouped-query attention (4 query heads, 2 K/V heads of 64): the paper's 4nd² would
    count K/V projections twice their size. 144 vision tokens, 32 text rows."""
    m = model_config(
        vision=dict(image_size=48, patch_size=4, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=2),
        text=dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=4,
                  num_heads=4, num_kv_heads=2),
        image_token_id=3)
    cfg = make_config(m, "unroll=True")
    cfg.train.batch_size, cfg.data.max_len = 1, 32
    return cfg


def test_analytic_forward_matches_xla_and_hidrop_saves_the_per_layer_difference():
    """XLA's count of the compiled, unrolled forward (every row's logits) is the analytic one
    within 2% (the rest: norms, RoPE, softmax, masks, 1 FLOP each). A HiDrop schedule's count
    is lower by Σ_l [F(T + 144) − F(T + n_l)] in both; XLA's saving is within 2% of it (the
    cuts' scoring, a key projection of the entering tokens, is not model FLOPs)."""
    cfg = _gqa_config()
    params = abstract_params(cfg)
    T, d, m, q, kv = 32, 256, 512, 4 * 64, 2 * 64

    def layer(n):  # multiply-adds of one decoder layer over n tokens, by hand
        return n * d * (2 * q + 2 * kv) + 2 * n * n * q + 3 * n * d * m

    xla, analytic = {}, {}
    for name in ("vanilla", "tok64"):
        with_schedule(cfg, name)
        xla[name] = flops.prefill_flops(cfg, params, T, image=True, compile=True)
        analytic[name] = perf.model_flops(cfg, "forward")
    assert abs(xla["vanilla"] / analytic["vanilla"] - 1) < 0.02, xla["vanilla"] / analytic["vanilla"]
    tokens = schedule_of(cfg).tokens_per_layer()
    assert tokens != [144] * 4 and max(tokens) == 144
    by_hand = 2 * sum(layer(T + 144) - layer(T + n) for n in tokens)
    assert analytic["vanilla"] - analytic["tok64"] == pytest.approx(by_hand, rel=1e-12)
    saved = xla["vanilla"] - xla["tok64"]
    assert abs(saved / by_hand - 1) < 0.02, saved / by_hand


def test_chip_lookup_from_device_kind():
    """The strings `jax.devices()[0].device_kind` gives on each platform; CPU and unknown
    chips give None (no MFU rather than a wrong one)."""
    want = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5p": "v5p", "TPU v6 lite": "v6e",
            "NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H200": "h200",
            "NVIDIA A100-SXM4-80GB": "a100-80gb", "NVIDIA A100-SXM4-40GB": "a100-40gb",
            "cpu": None, "NVIDIA GeForce RTX 4090": None, "TPU v2": None}
    assert {k: perf.chip_name(k) for k in want} == want
    assert perf.peak_tflops(jax.devices()) is None  # the CPU this suite runs on
    assert perf.peak_tflops(jax.devices(), 12.5) == 12.5
    assert perf.CHIPS["h200"].peak_bf16 == perf.CHIPS["h100-sxm"].peak_bf16  # same GH100 die


def test_qwen_count_is_defined_and_counts_windows():
    """Qwen2.5-VL's tower: window blocks attend within 8×8-patch windows, so a tower with every
    block windowed costs less than one with every block full, by 2·D·(S² − Σ w²) per block."""
    from hidrop_jax.families import qwen2_5_vl
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                  window_size=112, image_size=(448, 448))
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, mrope_section=(2, 3, 3))

    def cfg_with(full):
        c = make_config(qwen2_5_vl.model_config(vision=dict(vision, fullatt_block_indexes=full), text=text))
        c.train.batch_size, c.data.max_len = 1, 16
        return c
    windowed, full = perf.flops_parts(cfg_with(())), perf.flops_parts(cfg_with((0, 1)))
    S, D = 32 * 32, 32  # 448 / 14 = 32 patches a side; windows of 8×8 patches tile it: 16 of 64
    assert full["tower"] - windowed["tower"] == 2 * 2 * D * (S * S - 16 * 64 ** 2)
    assert perf.model_flops(cfg_with(()), "train") > 0


# ----------------------------------------------------------------------------- (b, c) a short run

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


PEAK = 0.5  # TFLOP/s per device: the CPU has no table entry, so the run is given one


def _tiny_train_flops(B):
    """FLOPs of one training step of tests/tiny_config.py (vanilla, everything trained: 3× the
    forward), by hand. LLM: 4 layers, d 64, MLP 128, 4 query heads and 2 K/V heads of 16, over
    96 text rows + 16 vision tokens; LM head 96 rows × 64 × 128; CLIP: 17 tokens (16 patches +
    CLS) of width 32, MLP 64, one layer run (feature_layer −2 of 2), a 14×14×3 patch embedding;
    projector 16 × (32·64 + 64·64)."""
    n, d = 96 + 16, 64
    llm = 4 * (n * d * (2 * 64 + 2 * 32) + 2 * n * n * 64 + 3 * n * d * 128)
    head = 96 * 64 * 128
    tower = 4 * 17 * 32 ** 2 + 2 * 17 ** 2 * 32 + 2 * 17 * 32 * 64 + 16 * 14 * 14 * 3 * 32
    proj = 16 * (32 * 64 + 64 * 64)
    return 2 * B * 3 * (llm + head + tower + proj)


def test_run_logs_throughput_tflops_mfu_and_writes_the_profile(data_dir, tmp_path):
    cfg = tiny_config.get_config("schedule=vanilla")
    cfg.data.data_dir = data_dir
    cfg.train.update(steps=4, log_every=1, ckpt_every=4, peak_tflops=PEAK, profile_steps=(1, 3))
    t0 = time.time()
    train_lib.train(cfg, tmp_path)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    n_dev, B = jax.device_count(), cfg.train.batch_size
    for r in rows:
        s = r["step_time_s"]
        assert 0 < s and r["mfu"] == pytest.approx(r["model_tflops_per_s_per_device"] / PEAK, rel=1e-9)
        assert r["tokens_per_s_per_device"] * s * n_dev == pytest.approx(B * (96 + 16), rel=1e-9)
        assert r["model_tflops_per_s_per_device"] * 1e12 * s * n_dev == pytest.approx(_tiny_train_flops(B), rel=1e-9)
    assert sum(r["step_time_s"] for r in rows) < wall  # compile, eval, checkpoints left out
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces


@pytest.mark.slow
def test_profile_stops_when_training_fails_inside_the_window(data_dir, tmp_path):
    """A run that stops inside the window (here a non-finite loss; preemption leaves the loop
    the same way) still writes its trace, and leaves no profiler running."""
    cfg = tiny_config.get_config("schedule=vanilla")
    cfg.data.data_dir = data_dir
    cfg.train.update(steps=4, log_every=1, ckpt_every=4, lr=1e30, warmup_steps=1, profile_steps=(0, 4))
    with pytest.raises(train_lib.NonFiniteLoss):
        train_lib.train(cfg, tmp_path)
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    jax.profiler.start_trace(str(tmp_path / "again"))  # raises if a trace were still running
    jax.profiler.stop_trace()


@pytest.mark.parametrize("field,value,needle", [
    ("profile_steps", (3, 1), "train.profile_steps` = (3, 1)"),
    ("profile_steps", (0, 13), "b <= train.steps = 12"),
    ("profile_steps", (-1, 2), "0 <= a < b"),
    ("profile_steps", (1, 2, 3), "None or (a, b)"),
    ("peak_tflops", -1.0, "train.peak_tflops` = -1.0"),
])
def test_bad_values_name_the_field(field, value, needle):
    cfg = tiny_config.get_config()
    cfg.train[field] = value
    with pytest.raises(ValueError, match="allowed") as e:
        validate_train(cfg)
    assert needle in str(e.value)


def test_bad_profile_steps_on_the_command_line_is_one_line_and_writes_nothing(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "hidrop_jax.train", f"--config={ROOT}/tests/tiny_config.py",
                        f"--workdir={tmp_path / 'wd'}", f"--config.data.data_dir={data_dir}",
                        "--config.train.profile_steps=(5,2)"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: config field `train.profile_steps` = (5, 2)") and "0 <= a < b" in line, line
    assert not (tmp_path / "wd").exists()
