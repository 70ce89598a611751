"""Export to a Hugging Face LLaVA directory (legacy hub layout), loadable by transformers 4.57/5.x.

    python -m hidrop_jax.convert export-hf CKPT_DIR OUT_DIR [--tokenizer TOK_DIR]

Tensor names and transforms come from the family's table (`hf.mapping.TABLE` for LLaVA) (the inverse of import). The directory
is built in a temporary sibling and renamed into place when complete (`atomic.atomic_dir`), so an
interrupted export never leaves a model that looks whole. Shards are written one at a time: besides the parameters
themselves, at most one shard's worth of converted tensors is held in memory.

What is written: `config.json`, `model.safetensors` (or `model-0000k-of-0000n.safetensors` +
`model.safetensors.index.json` above `max_shard_bytes`), `hidrop_schedule.json` (`cfg.hidrop`:
HF's LLaVA runs all vision tokens, the schedule travels beside it), and with a tokenizer also the
tokenizer files, `preprocessor_config.json` (CLIP) and `processor_config.json` (LlavaProcessor).
A non-vanilla schedule also brings the family's HiDrop modeling file (`modeling_hidrop_llava.py` or
`modeling_hidrop_qwen2_5_vl.py`), `hidrop_torch.py` and an `auto_map` (`hf.remote_code`:
transformers runs the schedule with `trust_remote_code=True`); `--no-hidrop-code` leaves them out.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from hidrop_jax.atomic import atomic_dir, check_out_dir
from hidrop_jax.config import resolved
from hidrop_jax.hf.load import DATA_FILE, SCHEDULE_FILE, family_mapping
from hidrop_jax.hf.mapping import expected_tensors, to_hf, vision_to_hf
from hidrop_jax.hf.remote_code import add_hidrop_code
from hidrop_jax.model import abstract_params

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_DTYPE = np.float32  # we keep fp32 masters; HF loads fp32 and casts on request


# ----------------------------------------------------------------------------- checks

def _flat(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _hf_names(cfg) -> dict:
    """{parameter path: (HF name, `*` for the layer index if stacked, kind)} from the family's table."""
    return {path: (hf.replace("{i}", "*"), kind) for hf, path, kind in family_mapping(cfg).TABLE}


def check_params(cfg, params) -> None:
    """Every array's shape against `cfg.model` (`abstract_params`); one error names every HF
    tensor that is missing, unexpected or of the wrong shape (shapes in HF's [out, in] order)."""
    want, have, names = _flat(abstract_params(cfg)), _flat(params), _hf_names(cfg)

    def hf_shape(path, shape):
        kind = names[path][1] if path in names else "copy"
        try:
            if path.split("/")[1:2] == ["layers"]:  # stacked for nn.scan: [layers, ...]
                return f"{shape[0]} layers x {tuple(to_hf(kind, np.empty(shape[1:], np.int8)).shape)}"
            return str(tuple(to_hf(kind, np.empty(shape, np.int8)).shape))
        except (ValueError, IndexError):  # not even the right rank
            return f"{shape} (ours)"

    errors = []
    for path in sorted(set(want) | set(have)):
        label = f"tensor {names[path][0]!r} (parameter {path})" if path in names else f"parameter {path}"
        if path not in have:
            errors.append(f"missing {label}")
        elif path not in want:
            errors.append(f"unexpected {label} {hf_shape(path, tuple(np.shape(have[path])))}: "
                          "not in the config's model")
        elif tuple(np.shape(have[path])) != tuple(want[path].shape):
            errors.append(f"{label} has shape {hf_shape(path, tuple(np.shape(have[path])))}, the config "
                          f"expects {hf_shape(path, tuple(want[path].shape))}")
    if errors:
        raise ValueError("parameters do not match their config:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------- writing

def _expected(cfg) -> dict:
    return family_mapping(cfg).expected_tensors(cfg)


def _write_shard(path: Path, tensors: dict) -> None:
    """One safetensors file (the single place that writes tensor data; tests patch it)."""
    from safetensors.numpy import save_file
    save_file(tensors, str(path), metadata={"format": "pt"})


def _plan_shards(cfg, params, max_shard_bytes: int):
    """[[HF name, ...] per shard] in TABLE order; a tensor larger than the limit gets its own."""
    flat = _flat(params)
    shards, cur, size = [], [], 0
    for name, (path, layer, _) in _expected(cfg).items():
        shape = np.shape(flat[path])[1:] if layer is not None else np.shape(flat[path])
        n = int(np.prod(shape)) * np.dtype(_DTYPE).itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    return shards + [cur] if cur else shards


def _hf_tensor(flat, path, layer, kind) -> np.ndarray:
    a = flat[path]
    if layer is not None:
        a = a[layer]  # device/array slice: only this layer is copied to host
    return np.ascontiguousarray(to_hf(kind, np.asarray(a, dtype=_DTYPE)))


def _write_weights(tmp: Path, cfg, params, max_shard_bytes: int) -> None:
    want, flat = _expected(cfg), _flat(params)
    shards = _plan_shards(cfg, params, max_shard_bytes)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for fname, names in zip(files, shards):
        tensors = {n: _hf_tensor(flat, *want[n]) for n in names}
        _write_shard(tmp / fname, tensors)
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def hf_config(cfg) -> dict:
    """`config_to_hf(cfg)` plus the storage dtype (4.57 reads `torch_dtype`, 5.x `dtype`)."""
    out = family_mapping(cfg).config_to_hf(cfg)
    out["torch_dtype"] = out["dtype"] = "float32"
    try:
        import transformers
        out["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return out


def _check_tokenizer(cfg, tokenizer) -> str:
    """The image token's string; fails unless the tokenizer fits the model."""
    m = cfg.model
    if len(tokenizer) > m.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size={m.text.vocab_size}")
    image_token = tokenizer.convert_ids_to_tokens(m.image_token_id)
    if image_token is None or tokenizer.convert_tokens_to_ids(image_token) != m.image_token_id:
        raise ValueError(f"tokenizer has no token with id image_token_id={m.image_token_id}")
    ids = tokenizer.encode(image_token * 3, add_special_tokens=False)  # as the processor expands it
    if ids != [m.image_token_id] * 3:
        raise ValueError(f"tokenizer encodes the image token {image_token!r} (id {m.image_token_id}) "
                         f"repeated 3 times as {ids}: add it as a special token")
    return image_token


def save_hf(cfg, params, out_dir, tokenizer=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False, hidrop_code: bool = True) -> Path:
    """Writes a HF LLaVA or Qwen2.5-VL directory for (cfg, params); returns its path. `tokenizer`
    (a `PreTrainedTokenizerBase` whose vocabulary holds `cfg.model.image_token_id`) adds the
    tokenizer and an image processor (LLaVA: CLIP's + a LlavaProcessor, so `AutoProcessor`
    loads; Qwen: `Qwen2VLImageProcessor` for the fixed grid: the mapping's `write_processor`).
    `hidrop_code`: with a non-vanilla schedule, also the HiDrop modeling file + `auto_map`
    (`hf.remote_code`), so transformers runs the schedule with `trust_remote_code=True`."""
    out = Path(out_dir).absolute()
    check_out_dir(out, overwrite)
    check_params(cfg, params)
    image_token = _check_tokenizer(cfg, tokenizer) if tokenizer is not None else None
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_weights(tmp, cfg, params, max_shard_bytes)
        if "hidrop" in cfg:
            (tmp / SCHEDULE_FILE).write_text(resolved(cfg).hidrop.to_json(indent=1) + "\n")
        if "data" in cfg and cfg.data.get("template"):  # the chat template the model was trained on
            (tmp / DATA_FILE).write_text(json.dumps(dict(template=cfg.data.template), indent=1) + "\n")
        if tokenizer is not None:
            family_mapping(cfg).write_processor(tmp, cfg, tokenizer, image_token)
        # config.json last: a directory with it is a complete model.
        conf = add_hidrop_code(tmp, cfg, hf_config(cfg)) if hidrop_code else hf_config(cfg)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return out


def save_hf_vision(out_dir, cfg, vision_params, *, metadata: dict | None = None) -> None:
    """`params["vision"]` as a HF `CLIPVisionModel` directory, replacing any previous one."""
    from safetensors.numpy import save_file
    with atomic_dir(out_dir, overwrite=True) as tmp:
        flat = _flat({"vision": vision_params})
        tensors = {name[len("vision_tower."):]: _hf_tensor(flat, path, layer, kind)
                   for name, (path, layer, kind) in expected_tensors(cfg).items() if path.startswith("vision/")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
        hf = {"architectures": ["CLIPVisionModel"], **vision_to_hf(cfg.model.vision), "torch_dtype": "float32"}
        (tmp / "config.json").write_text(json.dumps(hf, indent=1) + "\n")
