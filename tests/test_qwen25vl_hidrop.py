"""HiDrop on Qwen2.5-VL against a slow reference that removes tokens physically.

The reference (PyTorch, transformers' own Qwen2.5-VL modules, independent of hidrop_jax) runs
one sample at a time over the sample's valid tokens in sequence order:
- M-RoPE positions from HF's `get_rope_index` (each token keeps its own 3-D position for good);
- layers [0, inject) see the text tokens only; the merger's output joins at inject;
- attention is causal over the tokens present, in sequence order;
- after layer p in prune_after: layer p+1's input norm and q/k (with bias) rotated at the tokens'
  3-D positions score each present vision token (fp32 softmax of the last token's query row,
  averaged over heads); the k best stay, in original order;
- at exit every vision token leaves; logits = norm + head on the text tokens.
The static-shape JAX model must agree to <= 1e-5 in float32 logits, and keep the same tokens.
"""

import numpy as np
import pytest
import torch

from hf_tiny_qwen import IMAGE_TOKEN, make_batch, make_hf_qwen
from hidrop_jax.convert import load_hf
from hidrop_jax.hf.inputs import qwen_hf_to_inputs
from hidrop_jax.model import forward, forward_hf

pytestmark = pytest.mark.slow

TOL = 1e-5
N_LAYERS = 6
SCHEDULES = {  # (inject_layer, prune_after, keep, exit_layer); 24 vision tokens
    "hidrop": (1, (1, 3), (10, 3), 5),
    "pdrop": (0, (0, 2), (12, 4), None),
    "one_cut_exit": (2, (2,), (5,), 4),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_hidrop")
    hf = make_hf_qwen(d, text=dict(num_hidden_layers=N_LAYERS), tie=False, seed=3)
    cfg, params = load_hf(d, image_size=(16, 24))
    return hf, cfg, params


def _with_schedule(cfg, sched):
    cfg = cfg.copy_and_resolve_references()
    inject, prune_after, keep, exit_layer = sched
    cfg.hidrop.inject_layer, cfg.hidrop.prune_after, cfg.hidrop.keep = inject, prune_after, keep
    cfg.hidrop.exit_layer = exit_layer
    return cfg


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@torch.no_grad()
def reference(hf, sample, sched, query_at=None):
    """(logits [n_text, V] at the sample's text tokens, kept vision indices per cut). Scoring's
    query row is token `query_at` (default: the last token)."""
    inject, prune_after, keep, exit_layer = sched
    exit_layer = N_LAYERS if exit_layer is None else exit_layer
    ids = torch.tensor(sample["input_ids"])[None]
    is_img = ids[0] == IMAGE_TOKEN
    lm = hf.model.language_model
    h = lm.embed_tokens(ids)[0]
    grid = sample.get("image_grid_thw")
    if is_img.any():
        feats = torch.cat(hf.model.get_image_features(torch.tensor(sample["pixel_values"]),
                                                      torch.tensor(grid)).pooler_output)
        h[is_img] = feats
        pos3, _ = hf.model.get_rope_index(ids, torch.tensor(sample["mm_token_type_ids"])[None],
                                          torch.tensor(grid))
    else:
        pos3 = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    text = torch.nonzero(~is_img).flatten()
    vision = torch.nonzero(is_img).flatten()
    kept_log = []
    present_vis = vision[:0]
    for layer in range(N_LAYERS):
        if layer == inject:
            present_vis = vision
        if layer == exit_layer:
            present_vis = vision[:0]
        present = torch.sort(torch.cat([text, present_vis])).values
        n = len(present)
        cos, sin = lm.rotary_emb(h[None], pos3[:, :, present])
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        h[present] = lm.layers[layer](h[present][None], attention_mask=causal,
                                      position_embeddings=(cos, sin))[0]
        if layer in prune_after and len(present_vis):
            k = keep[prune_after.index(layer)]
            nxt = lm.layers[layer + 1]
            attn = nxt.self_attn
            x = nxt.input_layernorm(h[present])
            hd = attn.head_dim
            qi = n - 1 if query_at is None else int(torch.nonzero(present == query_at)[0, 0])
            q = _rotate(attn.q_proj(x[qi:qi + 1]).view(1, -1, hd), cos[0, qi:qi + 1, None],
                        sin[0, qi:qi + 1, None])
            kk = _rotate(attn.k_proj(x).view(n, -1, hd), cos[0, :, None], sin[0, :, None])
            kk = kk.repeat_interleave(q.shape[1] // kk.shape[1], dim=1)
            logit = torch.einsum("qnh,snh->nqs", q, kk).float() / hd ** 0.5
            logit[..., present > present[qi]] = float("-inf")
            probs = torch.softmax(logit, -1)
            score = probs.mean(0)[0]  # [n]
            vis_cols = torch.isin(present, present_vis)
            top = torch.topk(score[vis_cols], k).indices
            present_vis = torch.sort(present[vis_cols][top]).values
            kept_log.append(torch.searchsorted(vision, present_vis).numpy())
    logits = hf.lm_head(lm.norm(h[text]))
    return logits.numpy(), kept_log


def _samples(batch):
    """Per sample: its valid tokens (and its image) as an unpadded HF batch of one."""
    out, img = [], 0
    n_patch = None
    if "image_grid_thw" in batch:
        n_patch = int(np.prod(batch["image_grid_thw"][0]))
    for i in range(len(batch["input_ids"])):
        m = batch["attention_mask"][i].astype(bool)
        s = {k: batch[k][i][m] for k in ("input_ids", "mm_token_type_ids")}
        if (s["input_ids"] == IMAGE_TOKEN).any():
            s["pixel_values"] = batch["pixel_values"][img * n_patch:(img + 1) * n_patch]
            s["image_grid_thw"] = batch["image_grid_thw"][img:img + 1]
            img += 1
        out.append(s)
    return out


CASES = [(s, p, "hard") for s in SCHEDULES for p in ("right", "left")] + [("hidrop", "left", "mask")]


@pytest.mark.parametrize("sched,padding,selection", CASES)
def test_hidrop_equals_physical_removal(pair, sched, padding, selection):
    """`mask` keeps every slot and switches the dropped ones off as keys: the same logits."""
    hf, cfg, params = pair
    cfg = _with_schedule(cfg, SCHEDULES[sched])
    cfg.hidrop.selection = selection
    batch = make_batch([5, 4, 9], [2, None, 0], padding=padding, seed=7)
    out = np.asarray(forward_hf(cfg, params, **batch))
    inputs, slots, m = qwen_hf_to_inputs(cfg.model, batch["input_ids"], batch["pixel_values"],
                                         batch["attention_mask"], image_grid_thw=batch["image_grid_thw"],
                                         mm_token_type_ids=batch["mm_token_type_ids"])
    _, aux = forward(cfg, params, inputs, return_aux=True)
    for i, s in enumerate(_samples(batch)):
        ref, kept = reference(hf, s, SCHEDULES[sched])
        valid = batch["attention_mask"][i][slots[i]].astype(bool)
        np.testing.assert_allclose(out[i][valid], ref, atol=TOL, rtol=0)
        if (s["input_ids"] == IMAGE_TOKEN).any():
            assert len(kept) == len(aux["kept"])
            for ours, theirs in zip(aux["kept"], kept):
                np.testing.assert_array_equal(np.asarray(ours[i]), theirs)


def test_text_only_layers_ignore_the_image(pair):
    """Layers before inject never see the image: their text states are bit-identical when the
    pixels change; after inject they differ."""
    _, cfg, params = pair
    cfg = _with_schedule(cfg, SCHEDULES["one_cut_exit"])
    batch = make_batch([6], [2], seed=8)
    inputs, _, _ = qwen_hf_to_inputs(cfg.model, batch["input_ids"], batch["pixel_values"],
                                    batch["attention_mask"], image_grid_thw=batch["image_grid_thw"])
    other = inputs._replace(pixels=inputs.pixels + 1.0)
    _, a = forward(cfg, params, inputs, return_aux=True)
    _, b = forward(cfg, params, other, return_aux=True)
    np.testing.assert_array_equal(np.asarray(a["stage_text"][0]), np.asarray(b["stage_text"][0]))
    assert np.abs(np.asarray(a["stage_text"][1]) - np.asarray(b["stage_text"][1])).max() > 1e-4


@pytest.mark.parametrize("sched", ["vanilla", "hidrop"])
def test_cached_generation_equals_recomputation(pair, sched):
    """Greedy generation with per-stage caches: each new token's logits equal one forward of the
    prompt + the tokens generated so far (HF's own model for vanilla; the physical-removal
    reference, pruned once with the last prompt token as query, for HiDrop)."""
    from hidrop_jax.generate import generate_hf
    hf, cfg, params = pair
    if sched != "vanilla":
        cfg = _with_schedule(cfg, SCHEDULES[sched])
    batch = make_batch([5, 4, 7], [2, None, 0], padding="left", seed=9)
    n_new = 4
    out = generate_hf(cfg, params, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                      image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
                      max_new_tokens=n_new, return_logits=True)
    toks, logits = np.asarray(out["tokens"]), np.asarray(out["logits"])
    full = dict(batch)
    full["input_ids"] = np.concatenate([batch["input_ids"], toks], 1)
    full["attention_mask"] = np.concatenate([batch["attention_mask"], np.ones_like(toks)], 1)
    full["mm_token_type_ids"] = np.concatenate([batch["mm_token_type_ids"], np.zeros_like(toks)], 1)
    L = batch["input_ids"].shape[1]
    if sched == "vanilla":
        with torch.no_grad():
            ref = hf(**{k: torch.tensor(v) for k, v in full.items()}).logits.numpy()
        np.testing.assert_allclose(logits, ref[:, L - 1:L - 1 + n_new], atol=1e-4, rtol=0)
        return
    for i, s in enumerate(_samples(full)):
        n_prompt = int(batch["attention_mask"][i].sum())
        ref, _ = reference(hf, s, SCHEDULES[sched], query_at=n_prompt - 1)
        np.testing.assert_allclose(logits[i], ref[-n_new - 1:-1], atol=TOL, rtol=0)
