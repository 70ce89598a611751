"""A small model whose dimensions fill TPU tiles (multiples of 128 after 4-way sharding), so
the compiler's byte counts can be compared with an analytic count without padding noise.

    --config tests/aot_config.py:schedule=tok64
"""

from hidrop_jax.config import make_config, model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=dict(image_size=56, patch_size=14, hidden_size=512, intermediate_size=1024,
                    num_layers=2, num_heads=4),
        text=dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_layers=4,
                  num_heads=4, num_kv_heads=4, max_position_embeddings=8192),
        image_token_id=3)
    cfg = make_config(model, arg)
    cfg.train.update(trainable="all", batch_size=4, mesh=(1, -1, 1))
    cfg.data.update(max_len=128)
    return cfg
