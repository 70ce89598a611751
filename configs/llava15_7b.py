"""LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 tokens) + mlp2x_gelu + Vicuna-7B (32 layers).

    configs/llava15_7b.py                  vanilla
    configs/llava15_7b.py:schedule=tok64   HiDrop Tok64 (88.9% of vision compute pruned)
"""

from hidrop_jax.config import CLIP_L14_336, make_config, model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=CLIP_L14_336,
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096),
        image_token_id=32000)
    return make_config(model, arg)
