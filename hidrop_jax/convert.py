"""Weight exchange with Hugging Face LLaVA checkpoints (safetensors).

One declarative table maps each HF tensor (legacy hub layout) to a parameter path and a
transform; import reads every key layout transformers has used, and stacks per-layer tensors
for `nn.scan`.

    python -m hidrop_jax.convert import-hf HF_DIR OUT_DIR
    python -m hidrop_jax.convert export-hf CKPT_DIR OUT_DIR   (see hidrop_jax.export)
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np

from hidrop_jax.config import hidrop_defaults, initializer_range, model_config, resolved, upgrade

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
    return {"linear": lambda x: x.T, "conv": lambda x: x.transpose(2, 3, 1, 0), "copy": lambda x: x}[kind](a)


def to_hf(kind: str, a: np.ndarray) -> np.ndarray:
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
    if hf.get("model_type") != "llava":
        _unsupported("model_type", hf.get("model_type"), "'llava'")
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
    from hidrop_jax.config import n_vision_tokens
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


# ----------------------------------------------------------------------------- import

def _safetensor_files(hf_dir: Path):
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (hf_dir / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return [hf_dir / s for s in shards]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or model.safetensors.index.json) in {hf_dir}")
    return files


def _read_tensors(files):
    """Yields (name, float32 numpy array); bf16/fp16 files are widened (we keep fp32 masters)."""
    from safetensors import safe_open
    for f in files:
        with safe_open(str(f), framework="flax") as st:
            for name in st.keys():
                yield name, np.asarray(st.get_tensor(name), dtype=np.float32)


def _set(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def params_from_tensors(cfg, tensors, *, group: str | None = None,
                        ignore: Callable[[str], bool] = lambda name: False) -> dict:
    """Maps (name, array) pairs to our parameter tree; every problem is named in one error.
    With `group` ('vision', ...) only that part of the model is expected; names for which
    `ignore` (of the canonical name) is true are skipped."""
    from hidrop_jax.model import abstract_params
    want = {n: w for n, w in expected_tensors(cfg).items() if group is None or w[0].startswith(group + "/")}
    shapes = {"/".join(str(k.key) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    seen, errors, stacks, params = set(), [], {}, {}
    for raw, arr in tensors:
        name = canonical_name(raw)
        if name not in want:
            if ignore(name):
                continue
            errors.append(f"unexpected tensor {raw!r} {tuple(arr.shape)}")
            continue
        path, layer, kind = want[name]
        seen.add(name)
        value = to_ours(kind, arr)
        target = shapes[path][1:] if layer is not None else shapes[path]
        if value.shape != tuple(target):
            hf_shape = tuple(to_hf(kind, np.empty(target, np.int8)).shape)
            errors.append(f"tensor {raw!r} has shape {tuple(arr.shape)}, expected {hf_shape}")
            continue
        if layer is None:
            _set(params, path, value)
        else:
            stacks.setdefault(path, {})[layer] = value
    errors += [f"missing tensor {n!r}" for n in sorted(set(want) - seen)]
    if errors:
        raise ValueError("checkpoint does not match its config:\n  " + "\n  ".join(errors))
    for path, layers in stacks.items():
        _set(params, path, np.stack([layers[i] for i in range(len(layers))]))
    return params


def load_hf(hf_dir) -> tuple[ml_collections.ConfigDict, dict]:
    """(cfg, params) from a HF LLaVA directory (config.json + safetensors, sharded or not)."""
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist (expected a Hugging Face model directory)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    params = params_from_tensors(cfg, _read_tensors(_safetensor_files(hf_dir)))
    return cfg, jax.tree.map(np.asarray, params)


# ----------------------------------------------------------------------------- a CLIP vision tower

def load_hf_vision(cfg, hf_dir) -> dict:
    """`params["vision"]` from a HF `CLIPVisionModel` or `CLIPModel` directory (what LLaVA's
    `--vision_tower` names). Its vision config must equal `cfg.model.vision`; the text half of
    a CLIPModel and `position_ids` buffers are not parameters here and are skipped."""
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist (expected a Hugging Face CLIP directory)")
    hf = json.loads(cfg_file.read_text())
    kind = hf.get("model_type")
    if kind not in ("clip_vision_model", "clip"):
        raise ValueError(f"{cfg_file}: model_type = {kind!r}; allowed: 'clip_vision_model', 'clip'")
    have = vision_from_hf(hf if kind == "clip_vision_model" else hf.get("vision_config", {}))
    diff = [f"{k} = {v!r} (config: {cfg.model.vision[k]!r})" for k, v in have.items()
            if v != cfg.model.vision[k]]
    if diff:
        raise ValueError(f"{hf_dir} is not this model's vision tower: its " + ", ".join(diff))
    skip = lambda n: not n.startswith(_V) or n.endswith(".position_ids")  # noqa: E731
    params = params_from_tensors(cfg, _read_tensors(_safetensor_files(hf_dir)), group="vision", ignore=skip)
    return jax.tree.map(np.asarray, params["vision"])


def save_hf_vision(out_dir, cfg, vision_params, *, metadata: dict | None = None) -> None:
    """`params["vision"]` as a HF `CLIPVisionModel` directory (written aside, then renamed)."""
    import shutil
    import uuid

    from safetensors.numpy import save_file

    from hidrop_jax.export import _flat, _hf_tensor
    out = Path(out_dir).absolute()
    tmp, old = (out.with_name(f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}") for tag in ("tmp", "old"))
    tmp.mkdir(parents=True)
    try:
        flat = _flat({"vision": vision_params})
        tensors = {name[len("vision_tower."):]: _hf_tensor(flat, path, layer, kind)
                   for name, (path, layer, kind) in expected_tensors(cfg).items() if path.startswith("vision/")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
        hf = {"architectures": ["CLIPVisionModel"], **vision_to_hf(cfg.model.vision), "torch_dtype": "float32"}
        (tmp / "config.json").write_text(json.dumps(hf, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # the previous tower is only deleted once the new one is in place
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- our checkpoints

def save_checkpoint(out_dir, cfg, params) -> None:
    """OUT_DIR/config.json + OUT_DIR/params (orbax; written to a temp dir, renamed when done)."""
    import orbax.checkpoint as ocp
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params, force=True)
        ckptr.wait_until_finished()
    tmp = out / "config.json.tmp"
    tmp.write_text(resolved(cfg).to_json(indent=1))
    os.replace(tmp, out / "config.json")


def load_checkpoint(ckpt_dir, *, check_shapes: bool = True):
    """(cfg, params) from `save_checkpoint`'s directory or a training workdir (its latest
    checkpoint). With `check_shapes=False` the arrays keep the shapes they were saved with, so
    a config/array mismatch can be reported tensor by tensor (`export.check_params`)."""
    import orbax.checkpoint as ocp
    from hidrop_jax.model import abstract_params
    d = Path(ckpt_dir).absolute()
    if (d / "checkpoints").is_dir() and not (d / "params").exists():
        from hidrop_jax.evaluate import load_run
        cfg, params, _ = load_run(d)
        return cfg, params
    for need in ("config.json", "params"):
        if not (d / need).exists():
            raise FileNotFoundError(f"{d / need} does not exist (not a hidrop_jax checkpoint or "
                                    "training workdir)")
    cfg = upgrade(ml_collections.ConfigDict(json.loads((d / "config.json").read_text())))
    with ocp.StandardCheckpointer() as ckptr:
        if check_shapes:
            target = abstract_params(cfg)
        else:
            meta = ckptr.metadata(d / "params")
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  getattr(meta, "item_metadata", meta))
        params = ckptr.restore(d / "params", target)
    return cfg, params


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-hf", help="HF LLaVA dir -> orbax checkpoint + config.json")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    from hidrop_jax import export
    export.add_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd == "import-hf":
        cfg, params = load_hf(args.hf_dir)
        save_checkpoint(args.out_dir, cfg, params)
        from hidrop_jax.model import count_params
        print(f"imported {count_params(params):,} parameters from {args.hf_dir} -> {args.out_dir}")
    elif args.cmd == "export-hf":
        export.run_cli(args)


if __name__ == "__main__":
    main()
