"""User mistakes at the Python API (issue 15): `hf_to_inputs`, `forward_hf`, `generate_hf` and
`generate` reject ids outside the vocabulary, pixels without image tokens (and image tokens
without pixels), ragged inputs and sequences longer than the model's positions, with an error
that names the argument. The checks run before anything touches the weights, so most cases pass
no parameters at all; one valid call with real parameters shows the checks let good input by,
and one shows what an unchecked id used to give (NaN logits)."""

import jax
import numpy as np
import pytest

import tiny_config
from hidrop_jax import generate as gen_lib
from hidrop_jax.config import n_vision_tokens
from hidrop_jax.model import _jitted_forward, forward_hf, hf_to_inputs, init_params

CFG = tiny_config.get_config()  # vocab 128, <image> = 3, 16 vision tokens, 512 positions
M = CFG.model
N = n_vision_tokens(M)
VOCAB = M.text.vocab_size


def batch(b=2):
    """A valid HF-style batch: each sample `5 6 <image>×N 7 8`, NHWC pixels."""
    ids = np.array([[5, 6] + [M.image_token_id] * N + [7, 8]] * b)
    px = np.zeros((b, M.vision.image_size, M.vision.image_size, 3), np.float32)
    return ids, px, np.ones_like(ids)


ENTRY = {
    "hf_to_inputs": lambda ids, px, mask: hf_to_inputs(M, ids, px, mask),
    "forward_hf": lambda ids, px, mask: forward_hf(CFG, None, ids, px, mask),
    "generate_hf": lambda ids, px, mask: gen_lib.generate_hf(CFG, None, ids, px, mask,
                                                             max_new_tokens=1),
}


def _set(a, idx, v):
    a = np.array(a)
    a[idx] = v
    return a


ids0, px0, mask0 = batch()
CASES = {  # name: (input_ids, pixel_values, attention_mask, error type, regex the message must match)
    "id = vocab_size": (_set(ids0, (1, 0), VOCAB), px0, mask0, ValueError,
                        rf"input_ids\[1, 0\] = {VOCAB} is outside the vocabulary; allowed: 0\.\.{VOCAB - 1}"),
    "negative id": (_set(ids0, (0, -1), -1), px0, mask0, ValueError, r"input_ids\[0, \d+\] = -1"),
    "ragged ids": ([[5, 6, 7], [5, 6]], None, None, ValueError, r"input_ids is ragged .*\[2, 3\]"),
    "float ids": (ids0.astype(np.float32), px0, mask0, TypeError, "input_ids has dtype float32"),
    "1-D ids": (ids0[0], px0[:1], None, ValueError, r"input_ids has shape \(\d+,\); expected 2"),
    "pixels, no image token": (np.array([[5, 6, 7]] * 2), px0, None, ValueError,
                               "pixel_values holds 2 image.* no image token"),
    "image tokens, no pixels": (ids0, None, mask0, ValueError,
                                "input_ids sample 0 has image tokens .* pixel_values is None"),
    "NaN pixels": (ids0, _set(px0, (1, 0, 0, 0), np.nan), mask0, ValueError, "pixel_values contains NaN"),
    "longer than positions": (np.full((1, M.text.max_position_embeddings + 1), 5), None, None,
                              ValueError, r"input_ids sample 0 has 513 tokens .*max_position_embeddings = 512"),
    "ragged mask": (ids0, px0, [[1] * ids0.shape[1], [1]], ValueError, "attention_mask is ragged"),
    "mask of 2s": (ids0, px0, mask0 * 2, ValueError, r"attention_mask holds \[2\]; allowed: 0"),
    "mask shape": (ids0, px0, mask0[:, :-1], ValueError, "attention_mask has shape .* expected input_ids' shape"),
}


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_hf_input_names_the_argument(entry, case):
    ids, px, mask, err, needle = CASES[case]
    with pytest.raises(err, match=needle):
        ENTRY[entry](ids, px, mask)


def test_empty_pixel_values_means_no_images():
    """HF's convention for a batch without images: pixel_values with 0 rows."""
    inputs, _ = hf_to_inputs(M, np.array([[5, 6, 7]]), px0[:0], None)
    assert inputs.pixels is None and not np.asarray(inputs.has_image).any()


def test_padding_beyond_positions_is_fine():
    """Only attended tokens take positions: a long, mostly padded row is not too long."""
    ids = np.full((1, M.text.max_position_embeddings + 8), 5)
    mask = np.zeros_like(ids)
    mask[0, :10] = 1
    inputs, _ = hf_to_inputs(M, ids, None, mask)
    assert int(np.asarray(inputs.text_pos).max()) == 9


def test_generate_native_inputs():
    inputs, _ = hf_to_inputs(M, *batch())
    bad = inputs._replace(text_ids=inputs.text_ids.at[0, 1].set(VOCAB + 5))
    with pytest.raises(ValueError, match=rf"inputs\.text_ids\[0, 1\] = {VOCAB + 5} is outside"):
        gen_lib.generate(CFG, None, bad, max_new_tokens=1)
    with pytest.raises(ValueError, match="has_image is True for sample 0 but inputs.pixels is None"):
        gen_lib.generate(CFG, None, inputs._replace(pixels=None), max_new_tokens=1)


@pytest.mark.slow  # one compile of the tiny model (~10 s alone, more on a busy machine)
def test_valid_input_passes_and_unchecked_ids_gave_nan():
    params = init_params(CFG, jax.random.PRNGKey(0))
    ids, px, mask = batch()
    logits = np.asarray(forward_hf(CFG, params, ids, px, mask))
    assert logits.shape == (2, 4, VOCAB) and np.isfinite(logits).all()
    # what the check prevents: the same batch with an out-of-vocabulary id, straight into the
    # model (no check on this path) gives NaN logits for that sample
    inputs, _ = hf_to_inputs(M, ids, px, mask)
    raw = np.asarray(_jitted_forward(CFG.to_json())(  # forward_hf's compiled forward
        params, inputs._replace(text_ids=inputs.text_ids.at[1, 0].set(VOCAB + 1000))))
    np.testing.assert_allclose(raw[0], logits[0], rtol=1e-5, atol=1e-5)  # the other sample unchanged
    assert np.isnan(raw[1]).all()  # the embedding lookup out of bounds fills NaN
