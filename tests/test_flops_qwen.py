"""FLOPs of Qwen2.5-VL's vision tower: XLA's count vs the analytic one in benchmarks/flops.py, and
that count vs `hidrop_jax.perf`'s (written separately: the trainer's and the roofline's MFU read the latter).

What could fail: a window-attention block attends over the whole image (its cost would be the
full S²), the window permutation costs compute, the edge windows of a grid the windows do not
tile are miscounted, or the two analytic counts disagree.
"""

import importlib.util
import os

import jax
import pytest

from hidrop_jax.config import load_config, make_config
from hidrop_jax.families import qwen2_5_vl
from hidrop_jax.families.qwen2_5_vl import model_config
from hidrop_jax.model import abstract_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("benchmarks_flops", os.path.join(ROOT, "benchmarks", "flops.py"))
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


def _small(image_size):
    """A tower wide enough that norms and rotations are small beside the matmuls."""
    return make_config(model_config(
        vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=14,
                    window_size=112, fullatt_block_indexes=(1, 3), image_size=image_size),
        text=dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2,
                  num_heads=4, num_kv_heads=4, mrope_section=(8, 12, 12))), "unroll=True")


@pytest.mark.parametrize("image_size", [(224, 224), (280, 168)])  # tiled; ragged edge windows
def test_tower_xla_flops_match_the_formula(image_size):
    """A grid the windows tile costs the formula. With ragged edge windows the windowed blocks
    attend over the whole image under a segment mask (`QwenVisionBlock._attend`), so they
    also compute the masked-out S² − Σ w² logits and products: counted here by hand (20×12
    patches = 10×6 merged; windows of 4×4 merged: sides 4, 4, 2 × 4, 2)."""
    cfg = _small(image_size)
    xla = flops.tower_flops(cfg, abstract_params(cfg), compile=False) / 2
    extra = 0
    if image_size == (280, 168):
        S, windows = 240, sum((a * b * 4) ** 2 for a in (4, 4, 2) for b in (4, 2))
        extra = 2 * (S * S - windows) * 256 * 2  # 2 S² D per block, blocks 0 and 2 windowed
    assert xla == pytest.approx(flops.tower_formula_macs(cfg) + extra, rel=0.03)


@pytest.mark.parametrize("config", ["qwen2_5_vl_7b.py", "qwen2_5_vl_3b.py", "tiny_shapes_qwen.py"])
def test_aot_count_equals_the_benchmark_count(config):
    cfg = load_config(os.path.join(ROOT, "configs", config))
    tower, merger = qwen2_5_vl.tower_macs(cfg.model)
    assert tower + merger == flops.tower_formula_macs(cfg)
