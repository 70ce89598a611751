"""The CPU demo model: LLaVA-1.5's layout where it matters for HiDrop (336×336 images, an
image block in the middle of the prompt, late injection, pyramid cuts, exit) at a tiny size.

Sizes are set by the 20-minute budget of `make demo` on 2 CPU cores: with 14-px patches (576
vision tokens, LLaVA-1.5's count) a step of 16 samples takes ~3 s, so only ~300 steps fit; 28-px
patches give 144 tokens (the smallest the demo allows) and ~0.42 s per Tok64 step with the
tower frozen, so ~2,000 steps. `--config.model.vision.patch_size=14` restores 576 tokens (and needs its own tower).

Training is LLaVA's stage 2: the projector and the LLM learn, the vision tower starts from a
pretrained CLIP and stays frozen. Offline there is no CLIP for these images, so the tower is
pretrained on the dataset's own annotations (`python -m hidrop_jax.pretrain_tower`, committed in
`assets/tiny_shapes_clip` with its command); a tower trained from scratch through the LLM does
not learn the shapes' kinds within this budget (`benchmarks/vision_probe.py`). To train
everything from scratch: `--config.train.init_vision= --config.train.trainable=all`.

    configs/tiny_shapes.py:schedule=tok64
"""

from pathlib import Path

from hidrop_jax.config import make_config, model_config


def get_config(arg: str = ""):
    model = model_config(
        vision=dict(image_size=336, patch_size=28, hidden_size=64, intermediate_size=128,
                    num_layers=3, num_heads=4),
        text=dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=8,
                  num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024),
        image_token_id=3)
    cfg = make_config(model, arg)
    cfg.train.update(init_vision=str(Path(__file__).resolve().parents[1] / "assets" / "tiny_shapes_clip"),
                     trainable="projector+llm", steps=2000, batch_size=16, lr=2e-3, warmup_steps=50,
                     end_lr_ratio=0.05, weight_decay=0.01, log_every=10, eval_every=500,
                     eval_batches=8, ckpt_every=200)
    cfg.data.update(name="shapes_vqa", max_len=80)  # the longest conversation is 78 tokens
    return cfg
