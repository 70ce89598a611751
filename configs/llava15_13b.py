"""LLaVA-1.5-13B: CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna-13B (40 layers).

HiDrop presets are published for 32 layers; on 40 they scale with relative depth
(see `hidrop_jax.hidrop.schedule.preset`).
"""

from hidrop_jax.config import CLIP_L14_336, make_config, model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=CLIP_L14_336,
        text=dict(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_layers=40,
                  num_heads=40, num_kv_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096),
        image_token_id=32000)
    return make_config(model, arg)
