"""Opening datasets by name: builds (if needed) and returns TFDS data sources, no TensorFlow.

    source = load_source("shapes_vqa", "train", data_dir)                    # 20k/1k/1k
    source = load_source("shapes_vqa:train=40,validation=10,test=10", "train", data_dir)
    source = load_source("shapes_vqa/small", "validation", data_dir)
    source = load_source("llava_json:json_file=llava_v1_5_mix665k.json", "train", data_dir,
                         manual_dir="/data/llava")

Images come back as encoded bytes (decoded by the pipeline, where a bad one is a counted skip).

Where a run's data lives when `data.data_dir` is empty: `data_dir_for`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from hidrop_jax.data.shapes_vqa import ShapesVqa, shapes_config
from hidrop_jax.data.llava_json import LlavaJson, llava_json_config

log = logging.getLogger(__name__)

_SHAPES_ARGS = {"train": int, "validation": int, "test": int, "seed": int, "text_only_frac": float}
_LLAVA_ARGS = {"json_file": str, "image_dir": str, "num_validation": int, "name": str}


def _parse(spec: str):
    name, _, args = spec.partition(":")
    name, _, config = name.partition("/")
    kw = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"dataset arg {item!r} in {spec!r} is not key=value")
        kw[k] = v
    return name, config or None, kw


def _check_args(spec: str, name: str, config, kw: dict, allowed: dict) -> None:
    bad = set(kw) - set(allowed)
    if bad:
        raise ValueError(f"{name} args {sorted(bad)} unknown; allowed: {sorted(allowed)}")
    if kw and config:
        raise ValueError(f"{spec!r}: give a named config or args, not both")


# Datasets generated from code alone: the same spec gives the same bytes on every machine.
GENERATED = ("shapes_vqa",)


def default_data_dir() -> str:
    """The machine's shared folder for generated datasets: `$HIDROP_DATA_DIR`, else
    `$XDG_CACHE_HOME/hidrop_jax/tfds` (`~/.cache/hidrop_jax/tfds`). Builds of different
    sizes/seeds live side by side in it (their config names differ)."""
    if os.environ.get("HIDROP_DATA_DIR"):
        return os.environ["HIDROP_DATA_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "hidrop_jax", "tfds")


def data_dir_for(spec: str, data_dir: str | None, run_dir) -> str:
    """The data_dir to build/read `spec` in: `data_dir` (`data.data_dir`) when given. Else a
    generated dataset (shapes_vqa) goes to `default_data_dir()`, built once per machine rather
    than once per workdir (136 s for the 22k-example default), unless `run_dir` (the workdir's
    `data/`) already holds one from an earlier run. A dataset built from the user's files
    (llava_json) stays in `run_dir`: its name does not identify the files' contents, so a
    machine-wide copy could be stale."""
    if data_dir:
        return str(data_dir)
    name = _parse(spec)[0]
    if name in GENERATED and not (Path(run_dir) / name).is_dir():
        return default_data_dir()
    return str(run_dir)


@contextlib.contextmanager
def _build_lock(builder):
    """One build at a time per dataset and data_dir: another process that wants the same
    dataset waits here, then reuses the finished copy instead of generating it again (flock on
    `<data_dir>/.<name>-<config>.lock`). Where the filesystem has no flock (some FUSE mounts)
    nothing is locked: TFDS's build-then-rename still keeps a half-built copy unseen."""
    import fcntl
    root = Path(builder.data_dir_root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = builder.builder_config.name if builder.builder_config else "default"
    with open(root / f".{builder.name}-{cfg}.lock", "a") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s in %s", builder.info.full_name, root)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("no lock on %s (%s): building unlocked", root, e)
        yield  # the lock goes with the file


def make_builder(spec: str, data_dir: str):
    """The TFDS builder named by `spec` (see module doc); nothing is generated yet."""
    name, config, kw = _parse(spec)
    if name == "shapes_vqa":
        _check_args(spec, name, config, kw, _SHAPES_ARGS)
        cfg = config or shapes_config(**{k: _SHAPES_ARGS[k](v) for k, v in kw.items()})
        return ShapesVqa(data_dir=data_dir, config=cfg)
    if name == "llava_json":
        _check_args(spec, name, config, kw, _LLAVA_ARGS)
        if kw:
            if "json_file" not in kw:
                raise ValueError(f"{spec!r}: llava_json needs json_file=...")
            cfg = llava_json_config(**{k: _LLAVA_ARGS[k](v) for k, v in kw.items()})
        else:
            cfg = config or "mix665k"
        return LlavaJson(data_dir=data_dir, config=cfg)
    raise ValueError(f"dataset {name!r} unknown; allowed: shapes_vqa, llava_json")


def prepare(builder, manual_dir: str | None = None, quiet: bool = True):
    """Generates the dataset unless it is already in its data_dir (cached).

    Several processes may call this on one data_dir: they take turns (`_build_lock`), and the
    later ones reuse the first one's copy. TFDS also writes into a temporary folder and renames
    it at the end, so a build that dies leaves nothing half-made; if the rename loses a race
    anyway (no lock), the winner's copy is used.
    """
    import tensorflow_datasets as tfds
    if quiet:
        tfds.disable_progress_bar()
    dl = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    if builder.is_prepared():
        return builder
    fresh = lambda: type(builder)(data_dir=builder.data_dir_root, config=builder.builder_config)
    try:
        with _build_lock(builder):
            if builder.is_prepared():  # built by another process while we waited
                return fresh()  # (`builder` still holds the info it read before)
            builder.download_and_prepare(download_config=dl)
    except Exception:
        again = fresh()
        if not again.is_prepared():
            raise
        log.warning("%s was prepared by another process meanwhile; using it", builder.info.full_name)
        return again
    return builder


def load_source(spec: str, split: str, data_dir: str, *, manual_dir: str | None = None,
                build: bool = True, decode_images: bool = False):
    """A random-access TFDS data source (len, [i]) for `split`; built first if `build`."""
    import tensorflow_datasets as tfds
    builder = make_builder(spec, data_dir)
    if build:
        builder = prepare(builder, manual_dir)
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    return builder.as_data_source(split, decoders=decoders)
