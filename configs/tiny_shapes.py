"""The CPU demo model: LLaVA-1.5's layout where it matters for HiDrop (336×336 images, an
image block in the middle of the prompt, late injection, pyramid cuts, exit) at a tiny size.

Sizes are set by the 20-minute budget of `make demo` on 2 CPU cores: with 14-px patches (576
vision tokens, LLaVA-1.5's count) a step of 16 samples takes ~3 s, so only ~300 steps fit; 28-px
patches give 144 tokens (the smallest the demo allows) and 0.3–0.5 s per Tok64 step with the
tower frozen and the `v1_nosys` template (LLaVA's v1 without its constant 29-token system
sentence: 56 text rows instead of 80), so 1,500 steps, the budget of every row in RESULTS.md
(2,500 took 16 of the 20 minutes on a fresh clone here). `--config.model.vision.patch_size=14` restores 576
tokens (and needs its own tower).

The LLM and projector start from N(0, 1/width) (`initializer_range` = 128^-0.5 ≈ 0.088), not
HF's 0.02: 0.02 is ≈ 1/√width for a 4096-wide LLaMA but 4.4× smaller here, and attention, a
product of two such matrices, then starts so flat that finding the object a question names
took thousands of steps (BENCHMARKS.md: 0.35 → 0.51 at 800 steps).

Training is LLaVA's stage 2: the projector and the LLM learn, the vision tower starts from a
pretrained CLIP and stays frozen. Offline there is no CLIP for these images, so the tower is
pretrained on the dataset's own annotations, each patch token's kind, colour, row and column
(`python -m hidrop_jax.pretrain_tower --position`, committed in `assets/tiny_shapes_clip` with
its command); a tower trained from scratch through the LLM does
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
                  num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024,
                  initializer_range=128 ** -0.5),
        image_token_id=3)
    cfg = make_config(model, arg)
    cfg.train.update(init_vision=str(Path(__file__).resolve().parents[1] / "assets" / "tiny_shapes_clip"),
                     trainable="projector+llm", steps=1500, batch_size=16, lr=2e-3, warmup_steps=50,
                     end_lr_ratio=0.05, weight_decay=0.01, log_every=10, eval_every=500,
                     eval_batches=8, ckpt_every=200)
    # the longest conversation is 53 tokens without v1's system sentence
    cfg.data.update(name="shapes_vqa", template="v1_nosys", max_len=56)
    return cfg
