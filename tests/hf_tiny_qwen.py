"""Tiny random Hugging Face Qwen2.5-VL models built offline, and HF-style batches for them.

Patch 2, merge 2, window 8 px: a window is 2×2 merged tokens = 16 patches, so a 16×24 px image
(8×12 patches, 4×6 merged tokens) spans 6 windows, and 12×20 px (3×5 merged) has ragged edge
windows. Blocks 1 and 3 attend over the whole image, 0 and 2 within windows.
"""

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 118, 119
PATCH, MERGE, TEMPORAL = 2, 2, 2


def make_hf_qwen(out_dir=None, *, vision=None, text=None, seed=0, tie=True):
    """A tiny random Qwen2_5_VLForConditionalGeneration (float32, eager), optionally saved."""
    v = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
             patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, window_size=8,
             fullatt_block_indexes=[1, 3], tokens_per_second=2)
    v.update(vision or {})
    t = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    t.update(text or {})
    cfg = Qwen2_5_VLConfig(text_config=t, vision_config=v, image_token_id=IMAGE_TOKEN,
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END, tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def image_patches(rng, h_px, w_px, n=1):
    """n random still images as the processor flattens them: [n · H·W patches, 3·T·P·P] (a
    still image repeated over T), merge-block-major, and image_grid_thw [n, 3]."""
    gh, gw = h_px // PATCH, w_px // PATCH
    img = rng.normal(size=(n, 3, h_px, w_px)).astype(np.float32)
    x = np.repeat(img[:, None], TEMPORAL, axis=1)  # [n, T, C, H, W]
    x = x.reshape(n, 1, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # HF image_processing_qwen2_vl order
    return (x.reshape(n * gh * gw, 3 * TEMPORAL * PATCH * PATCH),
            np.tile(np.array([[1, gh, gw]], np.int64), (n, 1)))


def make_batch(lengths, image_at, *, h_px=16, w_px=24, padding="right", seed=0, pad_id=0):
    """HF-style batch: per sample a text length and where its image goes (None: no image), as
    `<|vision_start|><|image_pad|>×N<|vision_end|>` -> dict of numpy arrays for the HF model."""
    rng = np.random.default_rng(seed)
    n = (h_px // PATCH // MERGE) * (w_px // PATCH // MERGE)
    rows = []
    for length, at in zip(lengths, image_at):
        toks = list(rng.integers(3, VISION_START - 1, size=length))
        if at is not None:
            toks = toks[:at] + [VISION_START] + [IMAGE_TOKEN] * n + [VISION_END] + toks[at:]
        rows.append(toks)
    L = max(map(len, rows))
    ids = np.full((len(rows), L), pad_id, np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    n_img = sum(a is not None for a in image_at)
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE_TOKEN).astype(np.int64))
    if n_img:
        out["pixel_values"], out["image_grid_thw"] = image_patches(rng, h_px, w_px, n_img)
    return out


def hf_logits(model, batch):
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in batch.items()})
    return out.logits.float().numpy()
