"""Qwen2.5-VL-3B-Instruct: the 7B's vision tower + merger to 2048 + Qwen2.5-3B (36 layers, GQA
16/2, tied head), at a fixed 672×672 grid = 576 merged tokens.

    configs/qwen2_5_vl_3b.py                  vanilla
    configs/qwen2_5_vl_3b.py:schedule=tok64   HiDrop Tok64 (layer indices rescaled to 36)
"""

from configs.qwen2_5_vl_7b import VISION
from hidrop_jax.config import make_config
from hidrop_jax.families.qwen2_5_vl import model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=dict(VISION, out_hidden_size=2048),
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                  num_heads=16, num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  mrope_section=(16, 24, 24), max_position_embeddings=128000,
                  tie_word_embeddings=True))
    return make_config(model, arg)
