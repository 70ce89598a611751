"""Qwen2.5-VL-7B-Instruct: window-attention ViT (32 blocks, 1280 wide) + 2×2 merger + Qwen2-7B
(28 layers, GQA 28/4, untied head), at a fixed 672×672 grid = 576 merged tokens (LLaVA-1.5's
count, so every preset carries over; layer indices rescale to 28 layers).

    configs/qwen2_5_vl_7b.py                  vanilla
    configs/qwen2_5_vl_7b.py:schedule=tok64   HiDrop Tok64
"""

from hidrop_jax.config import make_config
from hidrop_jax.families.qwen2_5_vl import model_config

VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, window_size=112,
              fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2, image_size=(672, 672))


def get_config(arg: str = ""):
    model = model_config(
        vision=dict(VISION, out_hidden_size=3584),
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                  num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                  mrope_section=(16, 24, 24), max_position_embeddings=128000,
                  tie_word_embeddings=False))
    return make_config(model, arg)
