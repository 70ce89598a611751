"""One home for *a run on disk*: what a directory holds, how to open it, how to save it.

Three kinds of directory hold a model, and every command accepts all three (`open_run`):

  checkpoint  `config.json` + `params/` (orbax)       written by `convert import-hf`, `save_checkpoint`
  workdir     `config.json` + `checkpoints/<step>/`   a training run (train state + data position)
  hf          a Hugging Face LLaVA directory          `config.json` (model_type llava) + safetensors

A tokenizer travels beside the weights: `tokenizer/` in a checkpoint or workdir, the directory
itself for HF (`find_tokenizer`). The training state of a workdir is saved and restored here too
(orbax `CheckpointManager`, with every process's grain iterator position).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import grain.python as grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from hidrop_jax.atomic import atomic_dir
from hidrop_jax.config import resolved, upgrade
from hidrop_jax.hf.load import load_hf
from hidrop_jax.hf.mapping import config_from_hf
from hidrop_jax.model import abstract_params

KINDS = ("checkpoint", "workdir", "hf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Run(NamedTuple):
    cfg: ml_collections.ConfigDict
    params: dict
    step: Optional[int]  # the workdir step the parameters come from (None otherwise)
    kind: str
    path: Path


def kind_of(path) -> str:
    """Which of `KINDS` a directory is; a clear error when it is none of them."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'} does not exist: {d} is not a hidrop_jax "
                                "checkpoint, training workdir or Hugging Face LLaVA directory")
    if (d / "params").exists():
        return "checkpoint"
    if (d / "checkpoints").is_dir():
        return "workdir"
    if "model_type" in json.loads((d / "config.json").read_text()):
        return "hf"
    raise FileNotFoundError(f"{d} has a config.json but neither params/ (checkpoint), "
                            "checkpoints/ (training workdir) nor safetensors with a HF config")


def read_config(path) -> ml_collections.ConfigDict:
    """The config stored in any kind of directory, without reading weights (`cfg.model` and
    `cfg.hidrop`; a workdir's also has `train` and `data`)."""
    d = Path(path)
    raw = json.loads((d / "config.json").read_text())
    if kind_of(d) == "hf":
        return config_from_hf(raw)
    return upgrade(ml_collections.ConfigDict(raw))


def open_run(path, *, step: Optional[int] = None, check_shapes: bool = True) -> Run:
    """(cfg, params, step) from a checkpoint, a training workdir (its latest step, or `step`)
    or a HF LLaVA directory. With `check_shapes=False` a checkpoint's arrays keep the shapes
    they were saved with, so a mismatch can be reported tensor by tensor (`hf.save.check_params`)."""
    d = Path(path).absolute()
    kind = kind_of(d)
    if kind == "hf":
        if step is not None:
            raise ValueError(f"step={step}: {d} is a Hugging Face directory, it has no steps")
        cfg, params = load_hf(d)
        return Run(cfg, params, None, kind, d)
    if kind == "workdir":
        cfg, params, step = load_run(d, step=step)
        return Run(cfg, params, step, kind, d)
    if step is not None:
        raise ValueError(f"step={step}: {d} is a single checkpoint, it has no steps")
    cfg = read_config(d)
    with ocp.StandardCheckpointer() as ckptr:
        if check_shapes:
            target = abstract_params(cfg)
        else:
            meta = ckptr.metadata(d / "params")
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  getattr(meta, "item_metadata", meta))
        params = ckptr.restore(d / "params", target)
    return Run(cfg, params, None, kind, d)


def load_checkpoint(path, *, check_shapes: bool = True):
    """(cfg, params) of any kind of directory (`open_run` without the step)."""
    run = open_run(path, check_shapes=check_shapes)
    return run.cfg, run.params


def save_checkpoint(out_dir, cfg, params, *, tokenizer_dir=None, overwrite: bool = True) -> None:
    """OUT_DIR/config.json + OUT_DIR/params (orbax) [+ OUT_DIR/tokenizer], written whole or not
    at all. The schedule is recorded resolved (`config.resolved`)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / "tokenizer")
        (tmp / "config.json").write_text(resolved(cfg).to_json(indent=1))


def load_run(workdir, *, step: Optional[int] = None):
    """(cfg, params, step) of a training run: its config and the parameters of its latest (or
    the given) checkpoint, as numpy arrays."""
    workdir = Path(workdir).absolute()
    cfg_file = workdir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist: not a training workdir")
    cfg = upgrade(ml_collections.ConfigDict(json.loads(cfg_file.read_text())))
    mgr = ocp.CheckpointManager(workdir / "checkpoints")
    steps = mgr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ValueError(f"step={step}: {workdir / 'checkpoints'} holds steps {sorted(steps)}")
    target = {"params": abstract_params(cfg)}
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
        partial_restore=True)))
    return cfg, got["state"]["params"], step


# ----------------------------------------------------------------------------- tokenizers

def has_tokenizer(d) -> bool:
    return d is not None and any((Path(d) / f).is_file() for f in TOKENIZER_FILES)


def find_tokenizer(path, cfg=None, explicit: Optional[str] = None) -> Optional[Path]:
    """The tokenizer directory that belongs with the model in `path`: `explicit` if given (it
    must hold one), else `cfg.data.tokenizer`, `path/tokenizer`, `path` itself; None if none."""
    if explicit:
        if not has_tokenizer(explicit):
            raise FileNotFoundError(f"tokenizer directory {explicit} holds no {' or '.join(TOKENIZER_FILES)}")
        return Path(explicit)
    d = Path(path)
    cands = [cfg.data.get("tokenizer") if cfg is not None and "data" in cfg else None,
             d / "tokenizer", d]
    return next((Path(c) for c in cands if c and has_tokenizer(c)), None)


def copy_tokenizer(src, dst) -> None:
    """The tokenizer and processor files of `src` (a tokenizer or HF model directory) into `dst`."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "added_tokens",
                                               "chat_template", "processor", "preprocessor"))
                            or f.suffix == ".model"):
            shutil.copy2(f, dst / f.name)


# ----------------------------------------------------------------------------- training state

def checkpoint_manager(workdir: Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(workdir) / "checkpoints", options=opts)


def save_state(mgr, step: int, state, data_iter, *, force: bool = False) -> bool:
    """The train state and every process's data-iterator position (grain writes one file per
    process, so each host resumes its own shard)."""
    return mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  data=grain.PyGrainCheckpointSave(data_iter)),
                    force=force)


def restore_state(mgr, state, data_iter):
    """Latest checkpoint into `state`'s shapes and shardings; the data iterator resumes too."""
    step = mgr.latest_step()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                    data=grain.PyGrainCheckpointRestore(data_iter)))
    return got["state"], step
