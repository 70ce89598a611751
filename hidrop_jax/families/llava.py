"""LLaVA-1.5 as a model family: CLIP ViT (up to `feature_layer`) + MLP projector, 1-D RoPE
(rotation = order), NHWC pixels, its HF batch adapter and data-pipeline image.

Its `cfg.model` builder (`config.model_config`) predates the families and stays in `config`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hidrop_jax.checks import check_hf_batch
from hidrop_jax.data import image as image_lib
from hidrop_jax.data.templates import TEMPLATE_STRINGS
from hidrop_jax.families.base import Family, fail, hf_text_stream, initializer_range
from hidrop_jax.layers.clip import VisionDims, init_vision as init_clip, vision_hidden_state
from hidrop_jax.layers.projector import Projector

NAME = "llava"
VISION_ACTS = ("quick_gelu", "gelu")
PROJECTOR_ACTS = ("gelu",)
TEXT_ACTS = ("silu",)
STRATEGIES = ("default", "full")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "minimal", "full")
ATTENTION_IMPLS = (None, "xla", "cudnn", "pallas")
# The word-level tokenizer's special tokens (`<image>` = 3 as in `configs/tiny_shapes.py`).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")


def validate(m) -> None:
    """Fails naming the field, the value and what is allowed."""
    v, t = m.vision, m.text
    if v.hidden_act not in VISION_ACTS:
        fail("model.vision.hidden_act", v.hidden_act, f"one of {VISION_ACTS}")
    if t.hidden_act not in TEXT_ACTS:
        fail("model.text.hidden_act", t.hidden_act, f"one of {TEXT_ACTS}")
    if m.projector.hidden_act not in PROJECTOR_ACTS:
        fail("model.projector.hidden_act", m.projector.hidden_act, f"one of {PROJECTOR_ACTS}")
    if m.select_strategy not in STRATEGIES:
        fail("model.select_strategy", m.select_strategy, f"one of {STRATEGIES}")
    if m.dtype not in DTYPES:
        fail("model.dtype", m.dtype, f"one of {DTYPES}")
    if m.get("attention_impl") not in ATTENTION_IMPLS:
        fail("model.attention_impl", m.attention_impl, f"one of {ATTENTION_IMPLS}")
    if m.remat not in REMAT_POLICIES:
        fail("model.remat", m.remat, f"one of {REMAT_POLICIES}")
    fl = m.feature_layer
    if not isinstance(fl, int) or not -v.num_layers - 1 <= fl <= v.num_layers or fl == 0:
        fail("model.feature_layer", fl,
             f"a single int in [-{v.num_layers + 1}, {v.num_layers}] except 0 "
             "(an index into CLIP's hidden states; lists of layers are not supported)")
    if v.image_size % v.patch_size:
        fail("model.vision.image_size", v.image_size, f"a multiple of patch_size={v.patch_size}")
    if t.num_heads % t.num_kv_heads:
        fail("model.text.num_kv_heads", t.num_kv_heads, f"a divisor of num_heads={t.num_heads}")
    if v.hidden_size % v.num_heads:
        fail("model.vision.num_heads", v.num_heads, f"a divisor of hidden_size={v.hidden_size}")
    if not initializer_range(t) > 0:
        fail("model.text.initializer_range", t.initializer_range, "a positive float (the std of "
             "the LLM's and projector's weights at initialisation)")
    if t.head_dim % 2:
        fail("model.text.head_dim", t.head_dim, "an even number (RoPE rotates pairs)")


def feature_layers_run(m) -> int:
    """How many CLIP encoder layers must run to produce `feature_layer`'s hidden state."""
    fl = m.feature_layer
    return fl if fl >= 0 else m.vision.num_layers + 1 + fl


def n_vision_tokens(m) -> int:
    """Vision tokens per image fed to the LLM (CLS dropped for strategy `default`)."""
    n = (m.vision.image_size // m.vision.patch_size) ** 2
    return n if m.select_strategy == "default" else n + 1


def _dtype(m):
    return jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32


def vision_dims(m) -> VisionDims:
    v = m.vision
    return VisionDims(v.image_size, v.patch_size, v.num_channels, v.hidden_size,
                      v.intermediate_size, v.num_layers, v.num_heads, v.layer_norm_eps,
                      v.hidden_act, _dtype(m))


def init_vision(m, rng_tower, rng_projector) -> dict:
    """Boxed {"vision": CLIP tower, "projector": the MLP (LLM's init std, as HF LLaVA)}."""
    vd = vision_dims(m)
    proj = Projector(m.text.hidden_size, m.projector.bias, init_std=initializer_range(m.text))
    return {"vision": init_clip(vd, rng_tower),
            "projector": proj.init(rng_projector, jnp.zeros((1, 1, vd.hidden_size)))["params"]}


def encode_image(m, params, pixels):
    """pixels [B, H, W, C] -> projected vision tokens [B, n_vision, D_text]."""
    h = vision_hidden_state(vision_dims(m), params["vision"], pixels, feature_layers_run(m),
                            remat=m.remat, unroll=m.scan_unroll)
    if m.select_strategy == "default":
        h = h[:, 1:]
    proj = Projector(m.text.hidden_size, m.projector.bias, _dtype(m))
    return proj.apply({"params": params["projector"]}, h)


# ----------------------------------------------------------------------------- input

def hf_to_inputs(m, input_ids, pixel_values=None, attention_mask=None, **processor_outputs):
    """HF-style batch (image token expanded n_vision times) -> (`Inputs`, index of each text
    slot in `input_ids` [B, T], `m`).

    Positions follow HF generation: cumsum(attention_mask) − 1, so left and right padding give
    the same result. `pixel_values` is NCHW or NHWC with one row per sample, or one row per
    sample that has an image (HF's convention for a mixed batch). Bad input (ids outside the
    vocabulary, pixels without image tokens, ragged rows, ...) fails first: `checks.check_hf_batch`.
    """
    if processor_outputs:
        raise TypeError(f"forward_hf for LLaVA takes no {sorted(processor_outputs)}")
    ids, mask, pixel_values = check_hf_batch(m, input_ids, pixel_values, attention_mask)
    inputs, slots = hf_text_stream(m, ids, mask, n_vision_tokens(m))
    if bool(np.asarray(inputs.has_image).any()):
        inputs = inputs._replace(pixels=_pixels_nhwc(m, pixel_values, np.asarray(inputs.has_image)))
    return inputs, slots, m


def _pixels_nhwc(m, pixel_values, has_image):
    v = m.vision
    px = np.asarray(pixel_values, np.float32)
    want = (v.image_size, v.image_size)
    if px.ndim != 4:
        raise ValueError(f"pixel_values must be 4-D (NCHW or NHWC); got shape {px.shape}")
    if px.shape[1] == v.num_channels and px.shape[-1] != v.num_channels:
        px = px.transpose(0, 2, 3, 1)
    if px.shape[1:3] != want or px.shape[3] != v.num_channels:
        raise ValueError(f"pixel_values has shape {px.shape}; expected images of "
                         f"{v.image_size}×{v.image_size}×{v.num_channels} (NCHW or NHWC)")
    if px.shape[0] == int(has_image.sum()) != len(has_image):
        full = np.zeros((len(has_image),) + px.shape[1:], np.float32)
        full[has_image] = px
        px = full
    if px.shape[0] != len(has_image):
        raise ValueError(f"pixel_values has {px.shape[0]} images for {len(has_image)} samples, "
                         f"{int(has_image.sum())} of which have image tokens")
    return jnp.asarray(px)


def preprocess(m, image) -> np.ndarray:
    """An image -> [H, W, 3] float32: padded to a square, resized, CLIP-normalised."""
    return image_lib.preprocess(image, m.vision.image_size)


def pixels_shape(m) -> tuple:
    v = m.vision
    return (v.image_size, v.image_size, v.num_channels)


def example_vision(m, record, text: dict, spec, has_image: bool) -> dict:
    """The data pipeline's pixels of one example at `spec.image_size` (zeros without an image)."""
    if has_image:
        return {"pixels": image_lib.preprocess(record["image"], spec.image_size, spec.image_mean,
                                               spec.image_std)}
    return {"pixels": np.zeros((spec.image_size, spec.image_size, 3), np.float32)}


# ----------------------------------------------------------------------------- reports

def tower_macs(m) -> tuple:
    """(tower, projector) multiply-adds for one image (CLIP layers up to `feature_layer`)."""
    v, d = m.vision, m.text.hidden_size
    N, D, M = (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size, v.intermediate_size
    tower = feature_layers_run(m) * (4 * N * D * D + 2 * N * N * D + 2 * N * D * M) \
        + (N - 1) * v.patch_size ** 2 * v.num_channels * D
    return tower, n_vision_tokens(m) * (D * d + d * d)


def token_layout(m) -> tuple:
    grid = m.vision.image_size // m.vision.patch_size
    return grid, n_vision_tokens(m) != grid * grid, m.vision.image_size, lambda px: px


FAMILY = Family(
    name=NAME, title="LLaVA",
    validate=validate, n_vision_tokens=n_vision_tokens,
    chat_templates=("plain", "v1", "v1_nosys"), default_template="v1",
    init_vision=init_vision, encode_image=encode_image,
    hf_to_inputs=hf_to_inputs, processor_outputs=(), preprocess=preprocess,
    pixels_shape=pixels_shape, example_vision=example_vision, rope_rows=None,
    special_tokens=SPECIAL_TOKENS,
    token_roles=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                     additional_special_tokens=["<image>"]),
    template_strings=TEMPLATE_STRINGS,
    token_fields=(("image_token_id", "<image>"),),
    tower_macs=tower_macs, token_layout=token_layout,
    remote_code=("modeling_hidrop_llava.py", "HiDropLlavaConfig", "HiDropLlavaForConditionalGeneration"),
)
