"""A model small enough for training tests on 2 CPU cores (16 vision tokens, 4 layers).

    --config tests/tiny_config.py:schedule=tok64
"""

from hidrop_jax.config import make_config, model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=2),
        text=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=512),
        image_token_id=3)
    cfg = make_config(model, arg)
    cfg.train.update(trainable="all", steps=12, batch_size=4, lr=3e-3, warmup_steps=2,
                     log_every=2, eval_every=1000, eval_batches=1, ckpt_every=4, async_ckpt=False)
    cfg.data.update(name="shapes_vqa:train=64,validation=16,test=16", max_len=96)
    return cfg
