"""Aspect-ratio buckets for Qwen2.5-VL: an image at a grid smaller than `image_size`'s runs at
its own grid in the ViT and fills the first n_b of the N vision slots; the rest are dead.

What could fail: dead slots leak into attention (logits differ from HF PyTorch run on the image
at its own grid, where the dead slots do not exist); a cut keeps a dead slot while dropping a
live one (differs from the slow reference, which removes tokens physically); the padding's
content reaches a logit; the rotary positions of text after the image follow N, not the grid.
"""

import jax
import numpy as np
import pytest
import torch

from hf_tiny_qwen import IMAGE_TOKEN, hf_logits, make_batch, make_hf_qwen
from hidrop_jax.config import schedule_of
from hidrop_jax.convert import load_hf
from hidrop_jax.families import qwen2_5_vl as fam
from hidrop_jax.hf.inputs import qwen_hf_to_inputs
from hidrop_jax.model import encode_image, forward, forward_hf
from test_qwen25vl_hidrop import N_LAYERS, _samples, _with_schedule, reference

pytestmark = pytest.mark.slow  # ~5 min on 2 shared cores: HF models, 2 training compiles

CANON = (16, 16)  # 8×8 patches, 4×4 = 16 merged tokens = N; windows of 2×2 merged tokens
BUCKETS = ((16, 16), (8, 16), (16, 8))  # 2×4 and 4×2 merged tokens: n_b = 8 of N = 16
SCHEDULES = {  # (inject, prune_after, keep, exit); keep counts out of N = 16
    "hidrop": (1, (1, 3), (6, 3), 5),
    "keep_more_than_live": (0, (0, 2), (12, 4), None),  # 12 > n_b = 8: 4 dead picks stay dead
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_buckets")
    hf = make_hf_qwen(d, text=dict(num_hidden_layers=N_LAYERS), tie=False, seed=3)
    cfg, params = load_hf(d, image_size=CANON)
    cfg.model = fam.with_buckets(cfg.model, BUCKETS)
    return hf, cfg, params


def _batch(h_px, w_px, padding, seed=7):
    return make_batch([5, 4, 9], [2, None, 0], h_px=h_px, w_px=w_px, padding=padding, seed=seed)


def _worst(hf, out, batch):
    """Largest |ours − HF| over the valid non-image positions of each sample."""
    ref = hf_logits(hf, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    is_img = ids == IMAGE_TOKEN
    worst = 0.0
    for i in range(len(ids)):
        if is_img[i].any():
            keep, rows = np.flatnonzero(~is_img[i]), np.arange((~is_img[i]).sum())
        else:
            keep = np.flatnonzero(mask[i])
            rows = np.arange(len(keep)) + (out.shape[1] - len(keep) if mask[i, 0] == 0 else 0)
        valid = mask[i, keep].astype(bool)
        worst = max(worst, np.abs(out[i, rows][valid] - ref[i, keep][valid]).max())
    return worst


@pytest.mark.parametrize("size,padding", [((8, 16), "right"), ((16, 8), "left"), ((16, 16), "left")])
def test_bucket_equals_hf_at_its_own_grid(pair, size, padding):
    """Vanilla: a 2×4 (or 4×2) merged grid padded to 16 slots = HF on the image at that grid."""
    hf, cfg, params = pair
    batch = _batch(*size, padding)
    inputs, _, m = qwen_hf_to_inputs(cfg.model, batch["input_ids"], batch["pixel_values"],
                                     batch["attention_mask"], image_grid_thw=batch["image_grid_thw"],
                                     mm_token_type_ids=batch["mm_token_type_ids"])
    assert m is cfg.model and schedule_of(cfg).n_vision == 16  # the LLM shape stays N's
    n_b = size[0] * size[1] // 16
    assert inputs.pixels.shape[1:3] == (size[0] // 4, size[1] // 4)
    np.testing.assert_array_equal(np.asarray(inputs.vision_valid).sum(1), [n_b, 0, n_b])
    out = np.asarray(forward_hf(cfg, params, **batch))
    assert _worst(hf, out, batch) <= 1e-4


@pytest.mark.parametrize("sched,selection", [("hidrop", "hard"), ("keep_more_than_live", "hard"),
                                             ("keep_more_than_live", "mask")])
def test_bucket_hidrop_equals_physical_removal(pair, sched, selection):
    """The slow reference has only the n_b live tokens; ours keeps N slots with dead ones.
    Where a cut keeps more than the live tokens, the reference keeps them all."""
    hf, cfg, params = pair
    cfg = _with_schedule(cfg, SCHEDULES[sched])
    cfg.hidrop.selection = selection
    batch = _batch(8, 16, "left")
    n_b = 8
    out = np.asarray(forward_hf(cfg, params, **batch))
    inputs, slots, _ = qwen_hf_to_inputs(cfg.model, batch["input_ids"], batch["pixel_values"],
                                         batch["attention_mask"], image_grid_thw=batch["image_grid_thw"],
                                         mm_token_type_ids=batch["mm_token_type_ids"])
    _, aux = forward(cfg, params, inputs, return_aux=True)
    inject, prune_after, keep, exit_layer = SCHEDULES[sched]
    capped, live = [], n_b
    for k in keep:
        live = min(k, live)
        capped.append(live)
    for i, s in enumerate(_samples(batch)):
        ref, kept = reference(hf, s, (inject, prune_after, tuple(capped), exit_layer))
        valid = batch["attention_mask"][i][slots[i]].astype(bool)
        np.testing.assert_allclose(out[i][valid], ref, atol=1e-5, rtol=0)
        if (s["input_ids"] == IMAGE_TOKEN).any():
            for ours, theirs in zip(aux["kept"], kept):
                ours = np.asarray(ours[i])
                np.testing.assert_array_equal(ours[ours < n_b], theirs)


def test_dead_slots_change_no_logit(pair):
    """Random features and rotary positions in the dead slots, under a schedule whose first
    cut keeps more than the live tokens: every logit bit-identical; the cuts never keep a dead
    slot while a live one is dropped."""
    _, cfg, params = pair
    cfg = _with_schedule(cfg, SCHEDULES["keep_more_than_live"])
    batch = _batch(16, 8, "right", seed=11)
    inputs, _, _ = qwen_hf_to_inputs(cfg.model, batch["input_ids"], batch["pixel_values"],
                                     batch["attention_mask"], image_grid_thw=batch["image_grid_thw"],
                                     mm_token_type_ids=batch["mm_token_type_ids"])
    feats = np.asarray(encode_image(cfg.model, params, inputs.pixels))
    dead = ~np.asarray(inputs.vision_valid)
    assert dead.sum() == 8 + 16 + 8 and np.all(feats[[0, 2], 8:] == 0)  # zeros after n_b = 8
    rng = np.random.default_rng(0)
    noisy = feats + np.where(dead[..., None], rng.normal(size=feats.shape) * 10, 0).astype(np.float32)
    rope = np.asarray(inputs.vision_rope)
    noisy_rope = np.where(dead[:, None], rng.integers(0, 50, size=rope.shape), rope).astype(np.int32)
    run = jax.jit(lambda x, v: forward(cfg, params, x, vision=v, return_aux=True))
    a, aux_a = run(inputs, feats)
    b, aux_b = run(inputs._replace(vision_rope=noisy_rope), noisy)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    live = ~dead
    for i in (0, 2):
        prev = set(np.flatnonzero(live[i]))
        for (ka, kb) in zip(aux_a["kept"], aux_b["kept"]):
            ka, kb = np.asarray(ka[i]), np.asarray(kb[i])
            kept_live = set(ka) & prev
            assert kept_live == set(kb) & prev  # the same live tokens survive
            assert len(kept_live) == min(len(ka), len(prev))  # a dead pick only when all live kept
            prev = kept_live
    # the same schedule without the dead-slot mask would keep dead slots: the check can fail
    c, _ = run(inputs._replace(vision_valid=None, vision_rope=noisy_rope), noisy)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def test_cached_generation_on_a_bucket(pair):
    """Greedy generation on a 2×4 grid padded to 16 slots: each token's logits = HF's forward
    of the prompt + the tokens so far (the dead slots carried in every stage's cache)."""
    from hidrop_jax.generate import generate_hf
    hf, cfg, params = pair
    batch = make_batch([5, 4, 7], [2, None, 0], h_px=8, w_px=16, padding="left", seed=11)
    n_new = 4
    out = generate_hf(cfg, params, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                      image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
                      max_new_tokens=n_new, return_logits=True)
    toks, logits = np.asarray(out["tokens"]), np.asarray(out["logits"])
    assert not np.isin(toks, [118, 119, 120, 121]).any()  # HF would read them as vision tokens
    full = dict(batch)
    full["input_ids"] = np.concatenate([batch["input_ids"], toks], 1)
    full["attention_mask"] = np.concatenate([batch["attention_mask"], np.ones_like(toks)], 1)
    full["mm_token_type_ids"] = np.concatenate([batch["mm_token_type_ids"], np.zeros_like(toks)], 1)
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in full.items()}).logits.numpy()
    np.testing.assert_allclose(logits, ref[:, L - 1:L - 1 + n_new], atol=1e-4, rtol=0)


@pytest.mark.parametrize("sizes,words", [
    (((16, 16), (10, 16)), "multiples of patch_size·spatial_merge_size = 4; [10, 16] is not"),
    (((16, 16), (16, 20)), "at most image_size [16, 16]'s 16 merged tokens; [16, 20] has 20"),
    (((16, 16), (16, 16)), "distinct grids"),
])
def test_bad_buckets_fail_in_one_line(pair, sizes, words):
    _, cfg, _ = pair
    with pytest.raises(ValueError) as e:
        fam.with_buckets(cfg.model, sizes)
    msg = str(e.value)
    assert "\n" not in msg and "model.vision.buckets" in msg and words in msg, msg


def test_grid_beyond_n_fails(pair):
    _, cfg, params = pair
    batch = make_batch([5], [2], h_px=16, w_px=24, seed=1)  # 24 merged tokens > N = 16
    with pytest.raises(ValueError, match="at most image_size's 16"):
        forward_hf(cfg, params, **batch)


# ----------------------------------------------------------------------------- data and training

def _llava_json_dir(root):
    """llava_json records with landscape (2:1), portrait (1:2) and square images, and a
    text-only one: mixed aspect ratios as a real run reads them."""
    import json
    from PIL import Image
    (root / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"wide": (60, 120), "tall": (120, 60), "square": (90, 90)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"imgs/{name}.png")
    H, G = "human", "gpt"
    recs = []
    for i in range(14):
        kind = ("wide", "tall", "square", "wide", "tall", "wide", "tall")[i % 7]
        recs.append({"id": f"{kind}{i}", "image": f"imgs/{kind}.png", "conversations": [
            {"from": H, "value": "<image>\nwhat color is the square ?"}, {"from": G, "value": "red"}]})
    recs.append({"id": "text", "conversations": [
        {"from": H, "value": "what color is the circle ?"}, {"from": G, "value": "blue"}]})
    (root / "data.json").write_text(json.dumps(recs))
    return len(recs)


TRAIN_BUCKETS = ((112, 224), (224, 112))  # 4×8 and 8×4 merged tokens of image_size's 8×8 = 64


def _train_cfg(tmp_path):
    from pathlib import Path
    from hidrop_jax.config import load_config
    from hidrop_jax.data.tokenizer import shapes_vqa_tokenizer
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs" / "tiny_shapes_qwen.py") + ":schedule=tok64")
    cfg.model = fam.with_buckets(cfg.model, TRAIN_BUCKETS)
    cfg.model.text.num_layers = 4
    n = _llava_json_dir(tmp_path / "manual")
    shapes_vqa_tokenizer(str(tmp_path / "tok"), family="qwen2_5_vl")
    cfg.data.update(name="llava_json:json_file=data.json,num_validation=3",
                    manual_dir=str(tmp_path / "manual"), tokenizer=str(tmp_path / "tok"),
                    data_dir=str(tmp_path / "tfds"))
    cfg.train.update(dict(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1,
                          eval_every=1000, eval_batches=1, ckpt_every=6, async_ckpt=False))
    return cfg, n


def _hf_rope_model(cfg):
    """A minimal HF Qwen2.5-VL, for its `get_rope_index` only."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    return Qwen2_5_VLModel(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, out_hidden_size=32, patch_size=14,
                           spatial_merge_size=2), image_token_id=cfg.model.image_token_id,
        video_token_id=cfg.model.video_token_id, vision_start_token_id=cfg.model.vision_start_token_id))


def test_prompt_inputs_take_the_nearest_bucket(tmp_path):
    """`generate`'s CLI path: a tall image -> the 8×4 bucket, its 32 live slots, and M-RoPE rows
    equal to HF's `get_rope_index` for that grid."""
    from PIL import Image
    from hidrop_jax.data.setup import open_data
    from hidrop_jax.generate import prompt_inputs
    from hidrop_jax.hf.inputs import expand_image_tokens
    cfg, _ = _train_cfg(tmp_path)
    tok, _, _, _ = open_data(cfg, tmp_path / "w")
    img = Image.fromarray(np.full((100, 40, 3), 128, np.uint8))
    pixels, grid = fam.image_input(cfg.model, img)
    assert grid == (16, 8) and pixels.shape[:2] == (8, 4)
    inputs = prompt_inputs(cfg, tok, "what color is the square ?", pixels, "qwen2")
    n_b = 32
    assert np.asarray(inputs.vision_valid).sum() == n_b and np.asarray(inputs.vision_valid)[0, :n_b].all()
    one = {k: np.asarray(getattr(inputs, k)) for k in ("text_ids", "text_valid", "image_slot", "has_image")}
    full, mask, cols = expand_image_tokens(one, cfg.model.image_token_id, n_b)
    pos3, _ = _hf_rope_model(cfg).get_rope_index(
        torch.tensor(full), torch.tensor((full == cfg.model.image_token_id).astype(np.int64)),
        torch.tensor([[1, 16, 8]]), attention_mask=torch.tensor(mask))
    pos3 = pos3.numpy()[:, 0]
    np.testing.assert_array_equal(np.asarray(inputs.text_rope)[0], pos3[:, cols[0]])
    slot = int(inputs.image_slot[0])
    np.testing.assert_array_equal(np.asarray(inputs.vision_rope)[0][:, :n_b], pos3[:, slot:slot + n_b])


def test_pipeline_groups_by_bucket(tmp_path):
    """Each image goes to the bucket nearest its aspect ratio (the square one ties: the first
    listed), each batch holds one bucket, one pass sees every record once, and the M-RoPE rows
    equal HF's `get_rope_index` on the sequence with the bucket's n_b image tokens."""
    from hidrop_jax.data import pipeline as data_lib
    from hidrop_jax.data.setup import open_data
    from hidrop_jax.hf.inputs import expand_image_tokens
    cfg, _ = _train_cfg(tmp_path)
    tok, spec, train_src, _ = open_data(cfg, tmp_path / "w")
    batches = list(data_lib.eval_batches(train_src, tok, spec, batch_size=3))
    ids = [str(i) for b in batches for i, v in zip(b["id"], b["example_valid"]) if v]
    name = lambda x: x.decode() if isinstance(x, bytes) else str(x)  # noqa: E731
    assert sorted(ids) == sorted(name(train_src[i]["id"]) for i in range(len(train_src)))
    want = {"wide": (4, 8), "tall": (8, 4), "square": (4, 8)}
    hfm = _hf_rope_model(cfg)
    for b in batches:
        grid = b["pixels"].shape[1:3]
        assert b["pixels"].ndim == 4 and grid in want.values()
        for i, name in enumerate(b["id"]):
            if not b["example_valid"][i] or not b["has_image"][i]:
                continue
            assert want[str(name).rstrip("0123456789")] == grid
            n_b = grid[0] * grid[1]
            assert b["vision_valid"][i].sum() == n_b and b["vision_valid"][i][:n_b].all()
            one = {k: v[i:i + 1] for k, v in b.items()}
            full, mask, cols = expand_image_tokens(one, cfg.model.image_token_id, n_b)
            # drop the dead slots: HF's sequence has the bucket's n_b image tokens only
            pos3, _ = hfm.get_rope_index(torch.tensor(full), torch.tensor((full == cfg.model.image_token_id).astype(np.int64)),
                                         torch.tensor([[1, 2 * grid[0], 2 * grid[1]]]),
                                         attention_mask=torch.tensor(mask))
            pos3 = pos3.numpy()[:, 0]
            valid = one["text_valid"][0]
            np.testing.assert_array_equal(b["text_rope"][i][:, valid], pos3[:, cols[0]][:, valid])
            slot = int(b["image_slot"][i])
            np.testing.assert_array_equal(b["vision_rope"][i][:, :n_b], pos3[:, slot:slot + n_b])


def test_training_compiles_one_step_per_bucket(tmp_path):
    """`train.train` on mixed-aspect llava_json data: the loss is finite and the step was
    compiled once per bucket seen (≤ the two buckets; both appear in 6 batches of 2)."""
    from hidrop_jax import train as train_lib
    cfg, _ = _train_cfg(tmp_path)
    metrics = train_lib.train(cfg, tmp_path / "run")
    assert np.isfinite(metrics["loss"])
    assert metrics["compiled_step_shapes"] == len(TRAIN_BUCKETS)
