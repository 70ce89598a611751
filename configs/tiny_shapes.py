"""The CPU demo model: LLaVA-1.5's proportions where they matter for HiDrop (336×336 images,
patch 14 -> 576 vision tokens, 32 decoder layers would be slow here, so 8) at a tiny width.

    configs/tiny_shapes.py:schedule=tok64
"""

from hidrop_jax.config import make_config, model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=dict(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                    num_layers=3, num_heads=4),
        text=dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=8,
                  num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024),
        image_token_id=3)
    cfg = make_config(model, arg)
    # The demo trains from scratch (no pretrained CLIP here), so the vision tower trains too.
    cfg.train.update(trainable="all", steps=600, batch_size=16, lr=1e-3, warmup_steps=50,
                     end_lr_ratio=0.05, weight_decay=0.01, log_every=10, eval_every=200,
                     eval_batches=8, ckpt_every=100)
    cfg.data.update(name="shapes_vqa", max_len=96)
    return cfg
