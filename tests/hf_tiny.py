"""Tiny random Hugging Face LLaVA models built offline, and HF-style batches for them."""

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 95


def make_hf_llava(out_dir=None, *, vision=None, text=None, seed=0, **llava):
    """A tiny random LlavaForConditionalGeneration (float32, eager attention), optionally saved."""
    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             image_size=56, patch_size=14, projection_dim=16)
    v.update(vision or {})
    t = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=96, rms_norm_eps=1e-6, max_position_embeddings=256)
    t.update(text or {})
    n_patches = (v["image_size"] // v["patch_size"]) ** 2
    strategy = llava.get("vision_feature_select_strategy", "default")
    llava.setdefault("image_seq_length", n_patches + (strategy == "full"))
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=LlamaConfig(**t),
                      image_token_index=IMAGE_TOKEN, **llava)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1/0: randomise them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def make_batch(model, lengths, with_image, *, padding="right", seed=0, image_at=2, pad_id=0):
    """HF-style input_ids (image token expanded), attention_mask, position_ids, NCHW pixels for
    the samples that have an image (HF's convention)."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    n = cfg.image_seq_length
    rows = []
    for length, img in zip(lengths, with_image):
        toks = list(rng.integers(3, IMAGE_TOKEN - 1, size=length))
        if img:
            toks = toks[:image_at] + [IMAGE_TOKEN] * n + toks[image_at:]
        rows.append(toks)
    L = max(map(len, rows))
    ids = np.full((len(rows), L), pad_id, np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    vc = cfg.vision_config
    pixels = rng.normal(size=(int(sum(with_image)), 3, vc.image_size, vc.image_size)).astype(np.float32)
    return ids, mask, pos, pixels


def hf_logits(model, ids, mask, pos, pixels):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos),
                    pixel_values=torch.tensor(pixels) if len(pixels) else None)
    return out.logits.float().numpy()
