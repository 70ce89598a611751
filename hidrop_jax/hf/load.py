"""Hugging Face safetensors -> our parameters: a LLaVA directory, or just a CLIP vision tower.

Per-layer tensors are stacked for `nn.scan`; bf16/fp16 files are widened (we keep fp32 masters);
every mismatch is named in one error that names the file or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np

from hidrop_jax.families import family_name
from hidrop_jax.hf import mapping, qwen_mapping
from hidrop_jax.hf.mapping import _V, vision_from_hf
from hidrop_jax.model import abstract_params

# Each family's HF mapping module, by `cfg.model.family` (see `hf.mapping`'s docstring for what one
# holds). Not a `Family` member: the mapping modules import `config`, which imports the families.
MAPPINGS = {mp.FAMILY: mp for mp in (mapping, qwen_mapping)}


# Beside the weights of our exports (HF's LLaVA has no place for them): the HiDrop schedule the
# model was trained with and its chat template. `read_run_facts` brings them back on import.
SCHEDULE_FILE = "hidrop_schedule.json"
DATA_FILE = "hidrop_data.json"


def read_run_facts(hf_dir, cfg):
    """`cfg` (changed in place, returned) with the schedule and chat template an export
    recorded beside its weights; a directory without them stays vanilla."""
    d = Path(hf_dir)
    if (d / SCHEDULE_FILE).is_file():
        h = json.loads((d / SCHEDULE_FILE).read_text())
        cfg.hidrop.update({k: tuple(v) if isinstance(v, list) else v for k, v in h.items()})
    if (d / DATA_FILE).is_file():
        cfg.data = ml_collections.ConfigDict(json.loads((d / DATA_FILE).read_text()))
    return cfg


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
    from safetensors import SafetensorError, safe_open
    for f in files:
        try:
            with safe_open(str(f), framework="flax") as st:
                for name in st.keys():
                    yield name, np.asarray(st.get_tensor(name), dtype=np.float32)
        except (SafetensorError, OSError) as e:  # truncated or not a safetensors file
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None


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
    mp = family_mapping(cfg)
    want = {n: w for n, w in mp.expected_tensors(cfg).items() if group is None or w[0].startswith(group + "/")}
    shapes = {"/".join(str(k.key) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    seen, errors, stacks, params = set(), [], {}, {}
    for raw, arr in tensors:
        name = mp.canonical_name(raw)
        if name not in want:
            if ignore(name):
                continue
            errors.append(f"unexpected tensor {raw!r} {tuple(arr.shape)}")
            continue
        path, layer, kind = want[name]
        seen.add(name)
        value = mp.to_ours(kind, arr)
        target = shapes[path][1:] if layer is not None else shapes[path]
        if value.shape != tuple(target):
            hf_shape = tuple(mp.to_hf(kind, np.empty(target, np.int8)).shape)
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


def family_mapping(cfg):
    """The mapping module of `cfg`'s model family: `hf.mapping` (LLaVA) or `hf.qwen_mapping`."""
    return MAPPINGS[family_name(cfg.model)]


def load_hf(hf_dir, **kw) -> tuple[ml_collections.ConfigDict, dict]:
    """(cfg, params) from a HF LLaVA or Qwen2.5-VL directory (config.json + safetensors, sharded
    or not); the family comes from config.json's `model_type` (Qwen: `kw` = image_size, the
    fixed grid, default 672×672)."""
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist (expected a Hugging Face model directory)")
    hf = json.loads(cfg_file.read_text())
    # the family whose model_type it is; another model_type gets LLaVA's error naming the allowed ones
    mp = next((mp for mp in MAPPINGS.values() if mp.MODEL_TYPE == hf.get("model_type")), mapping)
    cfg = mp.config_from_hf(hf, **kw)
    params = params_from_tensors(cfg, _read_tensors(_safetensor_files(hf_dir)))
    return cfg, jax.tree.map(np.asarray, params)


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
