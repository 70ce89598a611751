"""The one mapping between Hugging Face LLaVA and our parameters and config, both directions.

One declarative table maps each HF tensor (legacy hub layout) to a parameter path and a
transform; `canonical_name` reads every key layout transformers has used. `load.py` and
`save.py` apply it; nothing else knows HF names. A family's mapping module has the members this
one has (`hf.load.MAPPINGS`): FAMILY, MODEL_TYPE, TABLE, canonical_name, to_ours, to_hf,
expected_tensors, config_from_hf, config_to_hf, write_processor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_collections
import numpy as np

from hidrop_jax.config import hidrop_defaults, initializer_range, model_config, n_vision_tokens
from hidrop_jax.data.image import CLIP_MEAN, CLIP_STD

FAMILY = "llava"       # `cfg.model.family`
MODEL_TYPE = "llava"   # config.json's `model_type`

# (HF name in the legacy hub layout, parameter path, transform). `{i}` marks a stacked layer.
# linear: HF [out, in] <-> [in, out]; conv: [O, I, kh, kw] <-> [kh, kw, I, O]; copy: as is.
_V = "vision_tower.vision_model."
_T = "language_model.model."
TABLE = [
    (_V + "embeddings.patch_embedding.weight", "vision/embeddings/patch_embedding/kernel", "conv"),
    (_V + "embeddings.class_embedding", "vision/embeddings/class_embedding", "copy"),
    (_V + "embeddings.position_embedding.weight", "vision/embeddings/position_embedding", "copy"),
    (_V + "pre_layrnorm.weight", "vision/embeddings/pre_layrnorm/scale", "copy"),
    (_V + "pre_layrnorm.bias", "vision/embeddings/pre_layrnorm/bias", "copy"),
    (_V + "post_layernorm.weight", "vision/post_layernorm/scale", "copy"),
    (_V + "post_layernorm.bias", "vision/post_layernorm/bias", "copy"),
    *[(_V + f"encoder.layers.{{i}}.self_attn.{p}.weight", f"vision/layers/{p}/kernel", "linear")
      for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    *[(_V + f"encoder.layers.{{i}}.self_attn.{p}.bias", f"vision/layers/{p}/bias", "copy")
      for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    *[(_V + f"encoder.layers.{{i}}.{n}.weight", f"vision/layers/{n}/scale", "copy")
      for n in ("layer_norm1", "layer_norm2")],
    *[(_V + f"encoder.layers.{{i}}.{n}.bias", f"vision/layers/{n}/bias", "copy")
      for n in ("layer_norm1", "layer_norm2")],
    *[(_V + f"encoder.layers.{{i}}.mlp.{p}.weight", f"vision/layers/{p}/kernel", "linear") for p in ("fc1", "fc2")],
    *[(_V + f"encoder.layers.{{i}}.mlp.{p}.bias", f"vision/layers/{p}/bias", "copy") for p in ("fc1", "fc2")],
    *[(f"multi_modal_projector.{p}.weight", f"projector/{p}/kernel", "linear") for p in ("linear_1", "linear_2")],
    *[(f"multi_modal_projector.{p}.bias", f"projector/{p}/bias", "copy") for p in ("linear_1", "linear_2")],
    (_T + "embed_tokens.weight", "text/embed_tokens/embedding", "copy"),
    (_T + "layers.{i}.input_layernorm.weight", "text/layers/input_layernorm/weight", "copy"),
    (_T + "layers.{i}.post_attention_layernorm.weight", "text/layers/post_attention_layernorm/weight", "copy"),
    *[(_T + f"layers.{{i}}.self_attn.{p}.weight", f"text/layers/self_attn/{p}/kernel", "linear")
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    *[(_T + f"layers.{{i}}.mlp.{p}.weight", f"text/layers/mlp/{p}/kernel", "linear")
      for p in ("gate_proj", "up_proj", "down_proj")],
    (_T + "norm.weight", "text/norm/weight", "copy"),
    ("language_model.lm_head.weight", "text/lm_head/kernel", "linear"),
]

# Other layouts transformers has written -> the legacy hub layout, applied in order.
_ALIASES = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
    (r"^vision_model\.", "vision_tower.vision_model."),  # CLIPModel; CLIPVisionModel (hub)
    (r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.", r"vision_tower.vision_model.\1."),  # 5.x
]


def canonical_name(name: str) -> str:
    for pat, rep in _ALIASES:
        name = re.sub(pat, rep, name)
    return name


def to_ours(kind: str, a: np.ndarray) -> np.ndarray:
    if kind.startswith("conv3d"):  # Conv3d with stride = kernel on flattened patches: a matmul
        return a.reshape(a.shape[0], -1).T
    return {"linear": lambda x: x.T, "conv": lambda x: x.transpose(2, 3, 1, 0), "copy": lambda x: x}[kind](a)


def to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    if kind.startswith("conv3d"):  # "conv3d:C,T,P,P" carries the kernel's shape [O, C, T, P, P]
        return a.T.reshape(a.shape[-1], *(int(x) for x in kind.split(":")[1].split(",")))
    return {"linear": lambda x: x.T, "conv": lambda x: x.transpose(3, 2, 0, 1), "copy": lambda x: x}[kind](a)


def expected_tensors(cfg):
    """{HF name: (parameter path, layer index or None, kind)} for this config."""
    m = cfg.model
    out = {}
    for hf, path, kind in TABLE:
        if path.startswith("text/lm_head") and m.text.tie_word_embeddings:
            continue
        if "{i}" in hf:
            n = m.vision.num_layers if path.startswith("vision/") else m.text.num_layers
            for i in range(n):
                out[hf.format(i=i)] = (path, i, kind)
        else:
            out[hf] = (path, None, kind)
    return out


# ----------------------------------------------------------------------------- config

def _unsupported(field, value, allowed):
    raise ValueError(f"HF config field `{field}` = {value!r} is not supported; allowed: {allowed}")


def vision_from_hf(v: dict) -> dict:
    """`model.vision` fields from a `CLIPVisionConfig` dict (HF's defaults where absent)."""
    return dict(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
        num_channels=v.get("num_channels", 3), hidden_size=v.get("hidden_size", 768),
        intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12), num_heads=v.get("num_attention_heads", 12),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"))


def vision_to_hf(v) -> dict:
    """A `CLIPVisionConfig` dict for `model.vision` (the inverse of `vision_from_hf`)."""
    return {
        "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
        "num_channels": v.num_channels, "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act, "projection_dim": v.hidden_size}


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Our config (`cfg.model`, `cfg.hidrop` = vanilla) from a LLaVA `config.json` dict."""
    if hf.get("model_type") != MODEL_TYPE:
        _unsupported("model_type", hf.get("model_type"), "'llava' (or 'qwen2_5_vl' through load_hf)")
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        _unsupported("vision_config.model_type", v.get("model_type"), "'clip_vision_model'")
    if t.get("model_type", "llama") != "llama":
        _unsupported("text_config.model_type", t.get("model_type"), "'llama'")
    for field in ("attention_bias", "mlp_bias"):
        if t.get(field):
            _unsupported(f"text_config.{field}", t[field], "false")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        _unsupported("text_config.rope_parameters.rope_type", rope.get("rope_type"), "'default'")
    theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
    fl = hf.get("vision_feature_layer", -2)
    if not isinstance(fl, int):
        _unsupported("vision_feature_layer", fl, "a single int (one CLIP layer)")
    heads = t.get("num_attention_heads", 32)
    model = model_config(
        vision=vision_from_hf(v),
        text=dict(
            vocab_size=t.get("vocab_size", 32000), hidden_size=t.get("hidden_size", 4096),
            intermediate_size=t.get("intermediate_size", 11008),
            num_layers=t.get("num_hidden_layers", 32), num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("head_dim") or t.get("hidden_size", 4096) // heads,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            hidden_act=t.get("hidden_act", "silu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            max_position_embeddings=t.get("max_position_embeddings", 4096),
            initializer_range=t.get("initializer_range", 0.02)),
        projector_act=hf.get("projector_hidden_act", "gelu"),
        projector_bias=hf.get("multimodal_projector_bias", True),
        image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
        feature_layer=fl,
        select_strategy=hf.get("vision_feature_select_strategy", "default"),
    )
    return ml_collections.ConfigDict(dict(model=model, hidrop=hidrop_defaults("vanilla")))


def config_to_hf(cfg) -> dict:
    """A LLaVA `config.json` dict for `cfg.model`, loadable by transformers 4.57 and 5.x (both
    `rope_theta` and `rope_parameters`: 4.57 ignores the latter silently)."""
    m = cfg.model
    v, t = m.vision, m.text
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": m.image_token_id, "image_seq_length": n_vision_tokens(m),
        "projector_hidden_act": m.projector.hidden_act, "multimodal_projector_bias": m.projector.bias,
        "vision_feature_layer": m.feature_layer, "vision_feature_select_strategy": m.select_strategy,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": vision_to_hf(v),
        "text_config": {
            "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
            "initializer_range": initializer_range(t)},
    }


# ----------------------------------------------------------------------------- processor files

def _image_processor(cfg):
    try:  # transformers 5 without torchvision: the PIL backend (what `CLIPImageProcessor` falls back to)
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    s = cfg.model.vision.image_size
    return Proc(do_resize=True, size={"shortest_edge": s}, resample=3, do_center_crop=True,
                crop_size={"height": s, "width": s}, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def write_processor(tmp: Path, cfg, tokenizer, image_token: str) -> None:
    """The tokenizer, CLIP's image processor and a `LlavaProcessor` (so `AutoProcessor` loads)."""
    from transformers import LlavaProcessor
    m = cfg.model
    proc = LlavaProcessor(
        image_processor=_image_processor(cfg), tokenizer=tokenizer, patch_size=m.vision.patch_size,
        vision_feature_select_strategy=m.select_strategy, image_token=image_token,
        num_additional_image_tokens=1)  # CLIP's CLS token ("default" drops it again)
    proc.save_pretrained(str(tmp))
    # transformers 5 nests the image processor in processor_config.json and names its generic
    # fast tokenizer `TokenizersBackend`; 4.x reads preprocessor_config.json and knows the same
    # class as `PreTrainedTokenizerFast` (5.x keeps that name as an alias). Write what both read.
    pre = tmp / "preprocessor_config.json"
    if not pre.exists():
        proc.image_processor.to_json_file(str(pre))
    edit_json(pre, lambda d: d.update(image_processor_type="CLIPImageProcessor")
               if d.get("image_processor_type", "").startswith("CLIPImageProcessor") else None)
    edit_json(tmp / "tokenizer_config.json", lambda d: d.update(tokenizer_class="PreTrainedTokenizerFast")
               if d.get("tokenizer_class") == "TokenizersBackend" else None)


def edit_json(path: Path, edit) -> None:
    """Rewrites a JSON file through `edit` (in place), if it exists."""
    if path.exists():
        d = json.loads(path.read_text())
        edit(d)
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
