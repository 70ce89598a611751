"""The mapping between Hugging Face Qwen2.5-VL and our parameters and config (`hf.load` and
`hf.save` apply it, as `hf.mapping` for LLaVA).

One declarative table in the hub layout (`visual.*`, `model.*`, `lm_head`), which is also what
transformers 5.24's `save_pretrained` writes; its in-memory layout (`model.visual.*`,
`model.language_model.*`) is read through aliases. Export writes the hub layout and a config
that transformers 5.x loads; the round trip is bit-identical.
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_collections

from hidrop_jax.config import hidrop_defaults, initializer_range
from hidrop_jax.data.image import CLIP_MEAN, CLIP_STD
from hidrop_jax.hf.mapping import _unsupported, edit_json, to_hf, to_ours  # noqa: F401  (shared transforms, incl. conv3d)
from hidrop_jax.families import qwen2_5_vl as family

FAMILY = family.NAME         # `cfg.model.family`
MODEL_TYPE = "qwen2_5_vl"    # config.json's `model_type`

# (HF name in the hub layout, parameter path, transform). `{i}` marks a stacked layer.
# linear: [out, in] <-> [in, out]; conv3d: [O, C, T, P, P] <-> [C·T·P·P, O]; copy: as is.
_V, _T = "visual.", "model."
TABLE = [
    (_V + "patch_embed.proj.weight", "vision/patch_embed/proj/kernel", "conv3d"),
    *[(_V + f"blocks.{{i}}.{n}.weight", f"vision/blocks/{n}/weight", "copy") for n in ("norm1", "norm2")],
    *[(_V + f"blocks.{{i}}.attn.{p}.weight", f"vision/blocks/{p}/kernel", "linear") for p in ("qkv", "proj")],
    *[(_V + f"blocks.{{i}}.attn.{p}.bias", f"vision/blocks/{p}/bias", "copy") for p in ("qkv", "proj")],
    *[(_V + f"blocks.{{i}}.mlp.{p}.weight", f"vision/blocks/{p}/kernel", "linear")
      for p in ("gate_proj", "up_proj", "down_proj")],
    *[(_V + f"blocks.{{i}}.mlp.{p}.bias", f"vision/blocks/{p}/bias", "copy")
      for p in ("gate_proj", "up_proj", "down_proj")],
    (_V + "merger.ln_q.weight", "projector/ln_q/weight", "copy"),
    *[(_V + f"merger.mlp.{k}.weight", f"projector/mlp_{k}/kernel", "linear") for k in (0, 2)],
    *[(_V + f"merger.mlp.{k}.bias", f"projector/mlp_{k}/bias", "copy") for k in (0, 2)],
    (_T + "embed_tokens.weight", "text/embed_tokens/embedding", "copy"),
    (_T + "layers.{i}.input_layernorm.weight", "text/layers/input_layernorm/weight", "copy"),
    (_T + "layers.{i}.post_attention_layernorm.weight", "text/layers/post_attention_layernorm/weight", "copy"),
    *[(_T + f"layers.{{i}}.self_attn.{p}.weight", f"text/layers/self_attn/{p}/kernel", "linear")
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    *[(_T + f"layers.{{i}}.self_attn.{p}.bias", f"text/layers/self_attn/{p}/bias", "copy")
      for p in ("q_proj", "k_proj", "v_proj")],
    *[(_T + f"layers.{{i}}.mlp.{p}.weight", f"text/layers/mlp/{p}/kernel", "linear")
      for p in ("gate_proj", "up_proj", "down_proj")],
    (_T + "norm.weight", "text/norm/weight", "copy"),
    ("lm_head.weight", "text/lm_head/kernel", "linear"),
]

# transformers 5.x in-memory names -> the hub layout (inverse of its load-time renaming).
_ALIASES = [(r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model.")]


def canonical_name(name: str) -> str:
    for pat, rep in _ALIASES:
        name = re.sub(pat, rep, name)
    return name


def expected_tensors(cfg):
    """{HF name: (parameter path, layer index or None, kind)} for this config."""
    m = cfg.model
    v = m.vision
    out = {}
    for hf, path, kind in TABLE:
        if path.startswith("text/lm_head") and m.text.tie_word_embeddings:
            continue
        if kind == "conv3d":
            kind = f"conv3d:{v.in_channels},{v.temporal_patch_size},{v.patch_size},{v.patch_size}"
        if "{i}" in hf:
            n = v.depth if path.startswith("vision/") else m.text.num_layers
            for i in range(n):
                out[hf.format(i=i)] = (path, i, kind)
        else:
            out[hf] = (path, None, kind)
    return out


# ----------------------------------------------------------------------------- config

def config_from_hf(hf: dict, image_size=(672, 672)) -> ml_collections.ConfigDict:
    """Our config (`cfg.model`, `cfg.hidrop` = vanilla) from a Qwen2.5-VL `config.json` dict
    (nested `text_config` as 5.x writes it, or flat as on the hub). `image_size` [h, w] px: the
    static grid (HF's is dynamic); `forward_hf` follows the batch's `image_grid_thw`."""
    if hf.get("model_type") != MODEL_TYPE:
        _unsupported("model_type", hf.get("model_type"), "'qwen2_5_vl'")
    t = hf.get("text_config") or hf  # the hub's flat layout keeps the text fields at the root
    v = hf.get("vision_config", {})
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "mrope"):
        _unsupported("text_config.rope_parameters.rope_type", rtype, "'default' (M-RoPE)")
    if t.get("use_sliding_window"):
        _unsupported("text_config.use_sliding_window", True, "false")
    vrope = v.get("rope_parameters") or {}
    heads = t.get("num_attention_heads", 64)
    model = family.model_config(
        vision=dict(
            depth=v.get("depth", 32), hidden_size=v.get("hidden_size", 3584),
            intermediate_size=v.get("intermediate_size", 3420), num_heads=v.get("num_heads", 16),
            patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2), window_size=v.get("window_size", 112),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            out_hidden_size=v.get("out_hidden_size", 3584), in_channels=v.get("in_channels", 3),
            hidden_act=v.get("hidden_act", "silu"), tokens_per_second=v.get("tokens_per_second", 4),
            rope_theta=float(vrope.get("rope_theta", 10000.0)), image_size=tuple(image_size),
            initializer_range=v.get("initializer_range", 0.02)),
        text=dict(
            vocab_size=t.get("vocab_size", 152064), hidden_size=t.get("hidden_size", 8192),
            intermediate_size=t.get("intermediate_size", 29568),
            num_layers=t.get("num_hidden_layers", 80), num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("hidden_size", 8192) // heads,  # HF ignores the config's head_dim
            rms_norm_eps=t.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1e6))),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            hidden_act=t.get("hidden_act", "silu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            max_position_embeddings=t.get("max_position_embeddings", 128000),
            initializer_range=t.get("initializer_range", 0.02)),
        image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        vision_end_token_id=hf.get("vision_end_token_id", 151653))
    return ml_collections.ConfigDict(dict(
        model=model, hidrop=hidrop_defaults("vanilla")))


def config_to_hf(cfg) -> dict:
    """A Qwen2.5-VL `config.json` dict (nested, as transformers 5.x writes it)."""
    m = cfg.model
    v, t = m.vision, m.text
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "image_token_id": m.image_token_id, "video_token_id": m.video_token_id,
        "vision_start_token_id": m.vision_start_token_id, "vision_end_token_id": m.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size, "in_channels": v.in_channels,
            "hidden_act": v.hidden_act, "tokens_per_second": v.tokens_per_second,
            "initializer_range": v.initializer_range,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}},
        "text_config": {
            "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": t.tie_word_embeddings, "use_sliding_window": False,
            "initializer_range": initializer_range(t)},
    }


# ----------------------------------------------------------------------------- processor files

def write_processor(tmp: Path, cfg, tokenizer, image_token: str) -> None:
    """The tokenizer and a `Qwen2VLImageProcessor` for the config's fixed grid (CLIP mean/std,
    min = max pixels = the grid's, so an image of `image_size` keeps it). No `Qwen2_5_VLProcessor`:
    in transformers 5.24 it also needs a video processor (torchvision)."""
    try:  # transformers 5 without torchvision: the PIL backend
        from transformers import Qwen2VLImageProcessorPil as Proc
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Proc
    v = cfg.model.vision
    h, w = v.image_size
    proc = Proc(size={"shortest_edge": h * w, "longest_edge": h * w}, patch_size=v.patch_size,
                merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    proc.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    edit_json(tmp / "tokenizer_config.json", lambda d: d.update(tokenizer_class="PreTrainedTokenizerFast")
               if d.get("tokenizer_class") == "TokenizersBackend" else None)
