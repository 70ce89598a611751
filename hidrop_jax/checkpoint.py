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

import gc
import json
import logging
import shutil
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from hidrop_jax.atomic import atomic_dir
from hidrop_jax.config import resolved, upgrade
from hidrop_jax.hf.load import load_hf, read_run_facts
from hidrop_jax.hf.mapping import config_from_hf
from hidrop_jax.model import abstract_params

KINDS = ("checkpoint", "workdir", "hf")
INTEGRITY = "integrity"  # a workdir's per-step checksum files (beside checkpoints/)
CHECKSUMS = "checksums.json"  # an import-hf checkpoint's
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
        return Run(read_run_facts(d, cfg), params, None, kind, d)
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
        params = _restore_or_fail(lambda: ckptr.restore(d / "params", target), f"checkpoint {d / 'params'}")
    verify(params, _read_json(d / CHECKSUMS), f"checkpoint {d}")
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
        (tmp / CHECKSUMS).write_text(json.dumps(checksums(params)))
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
    return cfg, _load_step(mgr, workdir, step, abstract_params(cfg)), step


def _load_step(mgr, workdir: Path, step: int, abstract, *, offer_older: bool = True):
    """One step's parameters as numpy arrays, verified (checksums, finiteness). A damaged step
    fails naming it and the newest older step that is intact."""
    target = {"params": abstract}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
        partial_restore=True))
    where = Path(workdir) / "checkpoints" / str(step)
    try:
        params = _restore_or_fail(lambda: mgr.restore(step, args=args), f"step {step} ({where})")["state"]["params"]
        verify({"params": params}, read_step_checksums(workdir, step), f"step {step} ({where})")
    except DamagedCheckpoint as e:
        if not offer_older:
            raise
        raise DamagedCheckpoint(f"{e}; {_older_intact(mgr, workdir, step, abstract)}") from None
    return params


def _older_intact(mgr, workdir, step, abstract) -> str:
    for s in sorted((x for x in mgr.all_steps() if x < step), reverse=True):
        try:
            _load_step(mgr, workdir, s, abstract, offer_older=False)
            return f"the newest intact step is {s} (use --step {s})"
        except DamagedCheckpoint:
            continue
    return "no older step is intact"


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
    process, so each host resumes its own shard), with checksums of every array."""
    workdir = Path(mgr.directory).parent
    write_step_checksums(workdir, step, state)
    saved = mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.PyGrainCheckpointSave(data_iter)),
                     force=force)
    prune_step_checksums(workdir, set(mgr.all_steps()) | {step})
    return saved


def restore_state(mgr, state, data_iter):
    """Latest checkpoint into `state`'s shapes and shardings; the data iterator resumes too."""
    step = mgr.latest_step()
    workdir = Path(mgr.directory).parent
    where = workdir / "checkpoints" / str(step)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
        got = _restore_or_fail(lambda: mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.PyGrainCheckpointRestore(data_iter))),
            f"step {step} ({where})")
        verify(got["state"], read_step_checksums(workdir, step), f"step {step} ({where})")
    except DamagedCheckpoint as e:
        raise DamagedCheckpoint(f"{e}; cannot resume. Move {where} aside to resume from the step "
                                "before it") from None
    return got["state"], step


# ----------------------------------------------------------------------------- integrity

class DamagedCheckpoint(ValueError):
    """Stored arrays that are not what was saved (changed bytes, truncated files, non-finite)."""


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


class _DropOrphanedTaskErrors(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith("Task exception was never retrieved")


def _restore_or_fail(restore, what: str):
    try:
        return restore()
    except (OSError, ValueError, RuntimeError) as e:  # tensorstore/orbax on damaged files
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        message = f"{what} cannot be read ({type(e).__name__}: {cause[:200]})"
    # orbax reads arrays in parallel asyncio tasks; it raises the first failure, and the others'
    # (the same damage) would each print "Task exception was never retrieved" and a traceback
    # whenever they are garbage-collected, around our one-line error. Collect them now, quietly.
    quiet = _DropOrphanedTaskErrors()
    logging.getLogger("asyncio").addFilter(quiet)
    try:
        gc.collect()
    finally:
        logging.getLogger("asyncio").removeFilter(quiet)
    raise DamagedCheckpoint(message)


def _crc(a) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(a).tobytes()):08x}"


def checksums(tree) -> list:
    """[{"name", "index", "crc32"}] of this process's data of every array in `tree`, one entry per
    distinct shard (`index` = [[start, stop], ...]), so any host can check what it restores."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if isinstance(leaf, jax.Array):
            seen = set()
            for sh in leaf.addressable_shards:
                index = [[sl.start or 0, leaf.shape[d] if sl.stop is None else sl.stop]
                         for d, sl in enumerate(sh.index)]
                if str(index) not in seen:
                    seen.add(str(index))
                    out.append(dict(name=name, index=index, crc32=_crc(np.asarray(sh.data))))
        elif hasattr(leaf, "shape"):
            out.append(dict(name=name, index=[[0, n] for n in np.shape(leaf)], crc32=_crc(np.asarray(leaf))))
    return out


def verify(tree, recorded, what: str) -> None:
    """Fails naming `what` and the arrays unless every recorded checksum that this process can
    check matches and every floating array is finite. `recorded` None = saved before checksums
    existed (finiteness only)."""
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(x, "dtype")}

    def finite(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return True
        parts = [sh.data for sh in x.addressable_shards] if isinstance(x, jax.Array) else [x]
        return all(np.isfinite(np.asarray(p, np.float32)).all() for p in parts)
    bad = [n for n, x in leaves.items() if not finite(x)]
    if bad:
        raise DamagedCheckpoint(f"{what} holds non-finite values in {', '.join(bad[:4])}")
    for rec in recorded or ():
        x = leaves.get(rec["name"])
        if x is None:
            continue  # a partial restore (e.g. parameters only)
        idx = tuple(slice(a, b) for a, b in rec["index"])
        if isinstance(x, jax.Array):
            data = next((np.asarray(sh.data) for sh in x.addressable_shards
                         if [[s.start or 0, x.shape[d] if s.stop is None else s.stop]
                             for d, s in enumerate(sh.index)] == rec["index"]), None)
            if data is None:
                continue  # another host holds this shard and checks it
        else:
            data = np.asarray(x)[idx]
        if _crc(data) != rec["crc32"]:
            bad.append(rec["name"] + ("" if len(rec["index"]) == 0 else str(rec["index"])))
    if bad:
        raise DamagedCheckpoint(f"{what} is damaged: {len(bad)} array(s) differ from their saved "
                                f"checksums ({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})")


def _step_file(workdir, step: int) -> Path:
    return Path(workdir) / INTEGRITY / f"{step}.p{jax.process_index()}.json"


def write_step_checksums(workdir, step: int, state) -> None:
    """Each process records its shards' checksums for `step`; files of deleted steps go too."""
    f = _step_file(workdir, step)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(checksums(state)))
    tmp.replace(f)


def read_step_checksums(workdir, step: int):
    """Every process's records for `step` (None if the step predates checksums)."""
    files = sorted((Path(workdir) / INTEGRITY).glob(f"{step}.p*.json"))
    return [r for f in files for r in json.loads(f.read_text())] if files else None


def prune_step_checksums(workdir, keep_steps) -> None:
    d = Path(workdir) / INTEGRITY
    for f in d.glob("*.p*.json") if d.is_dir() else ():
        if int(f.name.split(".")[0]) not in set(keep_steps):
            f.unlink(missing_ok=True)
