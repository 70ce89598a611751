"""A tiny Qwen2.5-VL on shapes_vqa: the family's layout where it matters for HiDrop (a window-
attention ViT with a full-attention block, the 2×2 merger as projector, M-RoPE with text after
the image at start + max(h, w), Qwen's chat template) at a size that trains on CPU.

224×224 px at patch 14 = a 16×16 patch grid = 8×8 = 64 merged vision tokens; 112-px windows
(Qwen's) are 4×4 merged tokens, so blocks 0 (windows) and 1 (full) take both attention paths.
The tokenizer is the word-level shapes_vqa one with Qwen's special tokens (ids 0-7: <unk>,
<|endoftext|> (pad), <|im_start|>, <|im_end|> (EOS), <|vision_start|>, <|vision_end|>,
<|image_pad|>, <|video_pad|>), built by `data.setup.open_data`. There is no pretrained tower
offline, so everything trains (`trainable=all`). rope_theta 1e4 (Qwen: 1e6) gives positions
< 200 more distinct rotations at head_dim 32. Schedules are LLaVA's presets at 64 tokens.

    python -m hidrop_jax.train --config configs/tiny_shapes_qwen.py:schedule=tok64 --workdir RUN
"""

from hidrop_jax.config import make_config
from hidrop_jax.families.qwen2_5_vl import model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                    fullatt_block_indexes=(1,), image_size=(224, 224)),
        text=dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=8,
                  num_heads=4, num_kv_heads=2, mrope_section=(4, 6, 6), rope_theta=1e4,
                  rms_norm_eps=1e-6, max_position_embeddings=1024,
                  initializer_range=128 ** -0.5),
        image_token_id=6, video_token_id=7, vision_start_token_id=4, vision_end_token_id=5)
    cfg = make_config(model, arg)
    cfg.train.update(trainable="all", steps=2500, batch_size=16, lr=2e-3, warmup_steps=50,
                     end_lr_ratio=0.05, weight_decay=0.01, log_every=10, eval_every=500,
                     eval_batches=8, ckpt_every=200)
    cfg.data.update(name="shapes_vqa", template="qwen2", max_len=80)
    return cfg
