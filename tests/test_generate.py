"""Generation: per-stage KV caches equal recomputation, HF parity, one compile, bad input, CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_tiny import IMAGE_TOKEN, make_batch, make_hf_llava
from hidrop_jax import generate as gen_lib
from hidrop_jax.convert import load_hf
from hidrop_jax.batch import Inputs, last_prompt_row
from hidrop_jax.hf.inputs import hf_to_inputs
from hidrop_jax.model import forward

MAX_NEW = 5
SCHEDULES = {
    "vanilla": dict(),
    # late injection, two cuts, early exit (6 layers, 16 vision tokens)
    "hidrop": dict(inject_layer=2, prune_after=(2, 3), keep=(8, 3), exit_layer=5),
    # PyramidDrop-like: all layers see the image, cuts, no exit, PDrop's renumbered positions
    "pdrop": dict(inject_layer=0, prune_after=(1, 3), keep=(10, 4), exit_layer=None,
                  positions="compacted"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_llava(d, text=dict(num_hidden_layers=6, num_key_value_heads=2))
    cfg, params = load_hf(d)
    params = jax.tree.map(jnp.asarray, params)
    return d, hf, cfg, params


def _with(cfg, **h):
    c = cfg.copy_and_resolve_references()
    c.hidrop.update(h)
    return c


def _ragged(cfg, hf, padding="right"):
    """3 prompts of different lengths, the last without an image."""
    ids, mask, _, px = make_batch(hf, [4, 9, 6], [True, True, False], seed=7, padding=padding)
    return ids, mask, px


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_cached_decoding_equals_recomputation(tiny, name):
    """Logits of every new token = a full HiDrop forward over prompt + the tokens generated so
    far, without a cache, with the prune decision scored by the last *prompt* token."""
    _, hf, cfg, params = tiny
    c = _with(cfg, **SCHEDULES[name])
    ids, mask, px = _ragged(cfg, hf)
    inputs, _ = hf_to_inputs(c.model, ids, px, mask)
    out = gen_lib.generate(c, params, inputs, max_new_tokens=MAX_NEW, return_logits=True)
    tokens, logits = np.asarray(out["tokens"]), np.asarray(out["logits"])
    assert tokens.shape == (3, MAX_NEW) and (np.asarray(out["lengths"]) == MAX_NEW).all()

    # the reference: text stream + all generated tokens (appended after the padding: memory
    # order is free, positions decide), the first t of them valid at step t
    B, T = inputs.text_ids.shape
    n = MAX_NEW - 1
    q_idx, q_valid = last_prompt_row(inputs)
    nxt = np.asarray(gen_lib.next_position(inputs, 16))
    np.testing.assert_array_equal(nxt, np.asarray(mask).sum(1))  # HF: prompt length
    fwd = jax.jit(lambda p, x: forward(c, p, x, return_aux=True))
    for t in range(MAX_NEW):
        ref_in = Inputs(
            jnp.concatenate([inputs.text_ids, jnp.asarray(tokens[:, :n])], 1),
            jnp.concatenate([inputs.text_pos, jnp.asarray(nxt[:, None] + np.arange(n))], 1),
            jnp.concatenate([inputs.text_valid, jnp.asarray(np.arange(n) < t)[None].repeat(B, 0)], 1),
            inputs.image_slot, inputs.has_image, inputs.pixels, q_idx, q_valid)
        ref, aux = fwd(params, ref_in)
        row = q_idx[:, 0] if t == 0 else jnp.full((B,), T + t - 1)
        ref_t = np.asarray(jnp.take_along_axis(ref, row[:, None, None], axis=1)[:, 0])
        np.testing.assert_allclose(logits[:, t], ref_t, atol=1e-5, rtol=0, err_msg=f"step {t}")
        for a, b in zip(aux["kept"], out["kept"]):  # same kept sets
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(out["kept"]) == len(SCHEDULES[name].get("prune_after", ()))
    if name == "hidrop":  # the image-less sample keeps nothing alive but still decodes
        assert np.asarray(out["kept"][1]).shape == (3, 3)


def test_vanilla_greedy_matches_pytorch_generate(tiny):
    _, hf, cfg, params = tiny
    ids, mask, px = _ragged(cfg, hf, padding="left")
    # an EOS that some sample first emits mid-way, so stopping and padding are compared too
    probe = np.asarray(gen_lib.generate_hf(cfg, params, ids, px, mask, max_new_tokens=MAX_NEW)["tokens"])
    i, j = next((i, j) for j in range(1, MAX_NEW) for i in range(len(probe))
                if probe[i, j] not in probe[i, :j])
    eos, pad = int(probe[i, j]), 1
    ours = gen_lib.generate_hf(cfg, params, ids, px, mask, max_new_tokens=MAX_NEW, eos_id=eos,
                               pad_id=pad)
    with torch.no_grad():
        theirs = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             pixel_values=torch.tensor(px), max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
    theirs = theirs[:, ids.shape[1]:].numpy()
    theirs = np.pad(theirs, ((0, 0), (0, MAX_NEW - theirs.shape[1])), constant_values=pad)
    np.testing.assert_array_equal(np.asarray(ours["tokens"]), theirs)
    lengths = np.asarray(ours["lengths"])
    assert lengths[i] == j + 1 and (theirs[i, j + 1:] == pad).all()
    for i, L in enumerate(lengths):  # EOS counted; pad after it
        assert (np.asarray(ours["tokens"])[i, L:] == pad).all()


def test_one_compile_sampling_and_top_p(tiny):
    _, hf, cfg, params = tiny
    ids, mask, px = _ragged(cfg, hf)
    key = jax.random.PRNGKey(3)
    runs = []
    for seed, temp in ((0, 1.0), (1, 3.0), (2, 0.5)):  # new prompts, new temperatures
        ids2 = np.where(ids == IMAGE_TOKEN, ids, np.random.default_rng(seed).integers(3, 90, ids.shape))
        runs.append(gen_lib.generate_hf(cfg, params, ids2, px, mask, max_new_tokens=MAX_NEW,
                                        temperature=temp, top_p=0.9, rng=key))
    f = gen_lib.compiled(cfg.to_json(), MAX_NEW, True, False)
    assert f._cache_size() == 1
    greedy = gen_lib.generate_hf(cfg, params, ids, px, mask, max_new_tokens=MAX_NEW)
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0)
    # a nucleus of one token is greedy; the same key gives the same sample; another key differs
    tiny_p = gen_lib.generate_hf(cfg, params, ids, px, mask, top_p=1e-6, rng=key, **kw)
    np.testing.assert_array_equal(np.asarray(tiny_p["tokens"]), np.asarray(greedy["tokens"]))
    hot = dict(kw, temperature=50.0)
    a = gen_lib.generate_hf(cfg, params, ids, px, mask, rng=key, **hot)["tokens"]
    b = gen_lib.generate_hf(cfg, params, ids, px, mask, rng=key, **hot)["tokens"]
    c = gen_lib.generate_hf(cfg, params, ids, px, mask, rng=jax.random.PRNGKey(4), **hot)["tokens"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()
    assert f._cache_size() == 1


def test_bad_input(tiny):
    _, hf, cfg, params = tiny
    ids, mask, px = _ragged(cfg, hf)
    with pytest.raises(ValueError, match=r"max_position_embeddings=256"):
        gen_lib.generate_hf(cfg, params, ids, px, mask, max_new_tokens=240)
    with pytest.raises(ValueError, match="explicit PRNG key"):
        gen_lib.generate_hf(cfg, params, ids, px, mask, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen_lib.generate_hf(cfg, params, ids, px, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        gen_lib.generate_hf(cfg, params, ids, px, mask, max_new_tokens=2, top_p=0.0)
    ends_with_image = np.concatenate([ids[:1, :2], np.full((1, 16), IMAGE_TOKEN)], 1)
    with pytest.raises(ValueError, match="ends with the image"):
        gen_lib.generate_hf(cfg, params, ends_with_image, px[:1], None, max_new_tokens=2)
    inputs, _ = hf_to_inputs(cfg.model, ids, px, mask)
    with pytest.raises(ValueError, match="expected"):
        gen_lib.generate(cfg, params, inputs._replace(pixels=inputs.pixels[:, :28]), max_new_tokens=2)


def test_cli_hf_dir(tiny, tmp_path, capsys):
    """`python -m hidrop_jax.generate --hf DIR`: a word-level tokenizer saved beside the weights,
    an image of the wrong size (resized), a HiDrop schedule; prints the answer and the cuts."""
    from PIL import Image

    from hidrop_jax.data.tokenizer import build_word_tokenizer
    d, _, _, _ = tiny
    build_word_tokenizer(["what colour is the square", "red green blue"], str(d))
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), np.uint8)).save(img)
    args = ["--hf", str(d), "--image", str(img), "--prompt", "what colour is the square?",
            "--max-new-tokens", "3", "--schedule", "tok64"]
    gen_lib.main(args)
    out = capsys.readouterr().out
    assert "cut after layer 2: kept 6 of 16" in out and "layers 0-1: text only" in out
    # --workdir: a hidrop_jax checkpoint with its tokenizer in DIR/tokenizer (same answer)
    from hidrop_jax.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "wd", *load_hf(d))
    build_word_tokenizer(["what colour is the square", "red green blue"], str(tmp_path / "wd/tokenizer"))
    gen_lib.main(["--workdir", str(tmp_path / "wd")] + args[2:])
    assert capsys.readouterr().out == out
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen_lib.main(args[:-4] + ["--max-new-tokens", "400"])
