"""Opening datasets by name: builds (if needed) and returns TFDS data sources, no TensorFlow.

    source = load_source("shapes_vqa", "train", data_dir)                    # 20k/1k/1k
    source = load_source("shapes_vqa:train=40,validation=10,test=10", "train", data_dir)
    source = load_source("shapes_vqa/small", "validation", data_dir)
    source = load_source("llava_json:json_file=llava_v1_5_mix665k.json", "train", data_dir,
                         manual_dir="/data/llava")

Images come back as encoded bytes (decoded by the pipeline, where a bad one is a counted skip).
"""

from __future__ import annotations

import logging

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

    TFDS writes into a temporary folder and renames it at the end, so several processes may
    call this on one shared data_dir: if another one finished first, its copy is used.
    """
    import tensorflow_datasets as tfds
    if quiet:
        tfds.disable_progress_bar()
    dl = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=dl)
    except Exception:
        again = type(builder)(data_dir=builder.data_dir_root, config=builder.builder_config)
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
