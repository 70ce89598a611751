"""Model configuration: one `ml_collections.ConfigDict` per model, validated early.

`cfg.model` mirrors the Hugging Face LLaVA config (vision / text / projector) with our own field
names; `cfg.hidrop` holds the HiDrop schedule: a preset name plus the fields that override it,
resolved against the model by `schedule_of` (see `hidrop_jax.hidrop.schedule`). This module is
the only reader of ConfigDicts: layers take small frozen dataclasses, the method a `Schedule`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ml_collections

from hidrop_jax.data.templates import TEMPLATES
from hidrop_jax.families import family
from hidrop_jax.families.base import fail as _fail
from hidrop_jax.families.base import initializer_range  # noqa: F401  (importable from here, as before)
from hidrop_jax.families.llava import feature_layers_run  # noqa: F401  (LLaVA's; as before)
from hidrop_jax.hidrop.schedule import PRESETS, Schedule, preset
from hidrop_jax.layers.common import INIT_STD


def model_config(
    *,
    vision: dict,
    text: dict,
    projector_act: str = "gelu",
    projector_bias: bool = True,
    image_token_id: int = 32000,
    feature_layer: int = -2,
    select_strategy: str = "default",
    dtype: str = "float32",
    remat: str = "none",
    scan_unroll: bool = False,
    attention_impl: str | None = None,
) -> ml_collections.ConfigDict:
    """Builds `cfg.model`. `vision`/`text` give the sizes; defaults follow LLaVA-1.5."""
    v = dict(num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    v.update(vision)
    t = dict(rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
             tie_word_embeddings=False, max_position_embeddings=4096, initializer_range=INIT_STD)
    t.update(text)
    t.setdefault("num_kv_heads", t["num_heads"])
    t.setdefault("head_dim", t["hidden_size"] // t["num_heads"])
    m = ml_collections.ConfigDict(dict(
        vision=v, text=t,
        projector=dict(hidden_act=projector_act, bias=projector_bias),
        image_token_id=image_token_id,
        feature_layer=feature_layer,
        select_strategy=select_strategy,
        dtype=dtype,
        remat=remat,
        scan_unroll=scan_unroll,
        # None = the platform's default (the Pallas flash kernel on TPU, XLA elsewhere),
        # "xla", "cudnn" (fails loudly where unsupported) or "pallas": see
        # hidrop_jax.layers.attention. Typed so that --config.model.attention_impl=xla can
        # override the None default.
        attention_impl=ml_collections.FieldReference(attention_impl, field_type=str),
    ))
    validate_model(m)
    return m


def model_from_dict(m) -> ml_collections.ConfigDict:
    """`cfg.model` rebuilt (validated, with typed fields) from a stored one, e.g. a config.json's."""
    m = ml_collections.ConfigDict(dict(m))
    return model_config(
        vision=m.vision.to_dict(), text=m.text.to_dict(), projector_act=m.projector.hidden_act,
        projector_bias=m.projector.bias, image_token_id=m.image_token_id,
        feature_layer=m.feature_layer, select_strategy=m.select_strategy, dtype=m.dtype,
        remat=m.remat, scan_unroll=m.scan_unroll, attention_impl=m.get("attention_impl"))


# CLIP ViT-L/14-336, LLaVA-1.5's vision tower (576 tokens per image).
CLIP_L14_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_layers=24, num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def validate_model(m: ml_collections.ConfigDict) -> None:
    """Fails naming the field, the value and what is allowed (the family's checks)."""
    family(m).validate(m)


RUNTIME_FIELDS = ("dtype", "remat", "scan_unroll", "attention_impl")  # how to run, not what


def architecture_diff(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list:
    """["model.FIELD: A != B", ...] where two `cfg.model`s describe different weights (runtime
    settings and how the weights were initialised do not count)."""
    def flat(m, prefix="model"):
        out = {}
        for k, v in m.items():
            if k in RUNTIME_FIELDS or k == "initializer_range":
                continue
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                out.update(flat(v, f"{prefix}.{k}"))
            else:
                out[f"{prefix}.{k}"] = tuple(v) if isinstance(v, list) else v
        return out
    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def n_vision_tokens(m: ml_collections.ConfigDict) -> int:
    """Vision tokens per image fed to the LLM (LLaVA: CLS dropped for strategy `default`)."""
    return family(m).n_vision_tokens(m)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARGS]` -> `get_config(ARGS)` of that Python file, as `--config FILE:ARGS` does."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def parse_arg(arg: str, defaults: dict) -> ml_collections.ConfigDict:
    """big_vision-style arg strings: "schedule=tok64,dtype=bfloat16" -> ConfigDict.

    Only keys present in `defaults` are accepted; values are cast to the default's type.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in arg.split(","))):
        key, sep, val = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config arg `{key}` is unknown; allowed: {sorted(defaults)}")
        d = defaults[key]
        if not sep:
            val = "True" if isinstance(d, bool) else val
        if isinstance(d, bool):
            if val not in ("True", "False", "true", "false", "1", "0"):
                raise ValueError(f"config arg `{key}` = {val!r}; allowed: True/False")
            out[key] = val in ("True", "true", "1")
        else:
            out[key] = type(d)(val) if d is not None else val
    return ml_collections.ConfigDict(out)


def make_config(model: ml_collections.ConfigDict, arg: str = "", **extra) -> ml_collections.ConfigDict:
    """Full config from `cfg.model` and an arg string. Common args: schedule (a HiDrop preset),
    selection, positions, dtype, remat, unroll (XLA sees every layer: for FLOPs counting)."""
    a = parse_arg(arg, dict(schedule="vanilla", selection="hard", positions="persistent",
                            dtype=model.dtype, remat=model.remat, unroll=False, **extra))
    model.dtype, model.remat, model.scan_unroll = a.dtype, a.remat, a.unroll
    validate_model(model)
    cfg = ml_collections.ConfigDict(dict(model=model, arg=a, train=train_defaults(), data=data_defaults()))
    cfg.hidrop = hidrop_defaults(a.schedule, selection=a.selection, positions=a.positions)
    schedule_of(cfg)  # an unknown preset or a bad field fails now; overrides are checked again
    return cfg


# ----------------------------------------------------------------------------- the HiDrop schedule

SCHEDULE_FIELDS = ("inject_layer", "prune_after", "keep", "exit_layer")


def hidrop_defaults(name: str = "vanilla", *, selection: str = "hard", positions: str = "persistent",
                    temperature: float = 0.1, **fields) -> ml_collections.ConfigDict:
    """`cfg.hidrop`: preset `name` and the layout fields that override it.

    A layout field left None means "the preset's value for this model"; `schedule_of` resolves it
    when the schedule is used, i.e. after every `--config.` override, so a preset always fits the
    model's final depth and token count (`--config.model.text.num_layers=6` rescales it).
    `exit_layer` = num_layers means "no exit". Saved configs hold every field resolved (`resolved`).
    """
    if name not in PRESETS:
        raise ValueError(f"hidrop schedule {name!r} is unknown; allowed: {PRESETS}")
    bad = sorted(set(fields) - set(SCHEDULE_FIELDS))
    if bad:
        raise ValueError(f"hidrop field(s) {bad} unknown; allowed: {SCHEDULE_FIELDS}")
    typed = dict(inject_layer=int, prune_after=tuple, keep=tuple, exit_layer=int)
    return ml_collections.ConfigDict(dict(
        name=name, selection=selection, positions=positions, temperature=temperature,
        # typed, so that `--config.hidrop.keep='(100,10)'` can override the None default
        **{k: ml_collections.FieldReference(fields.get(k), field_type=t) for k, t in typed.items()}))


def schedule_of(cfg) -> Schedule:
    """The validated `Schedule` of `cfg.hidrop` for `cfg.model`: the preset at this depth and
    token count, with the explicitly set fields on top."""
    h = cfg.hidrop
    explicit = {k: h.get(k) for k in SCHEDULE_FIELDS if h.get(k) is not None}
    return preset(h.get("name", "vanilla"), cfg.model.text.num_layers, n_vision_tokens(cfg.model),
                  selection=h.get("selection", "hard"), positions=h.get("positions", "persistent"),
                  temperature=h.get("temperature", 0.1), **explicit)


def with_schedule(cfg, name: str, **fields):
    """`cfg` (changed in place and returned) under preset `name` with `fields` on top; the
    selection/positions/temperature settings stay unless given."""
    h = cfg.get("hidrop") or {}
    keep = {k: fields.pop(k, h.get(k, d)) for k, d in
            (("selection", "hard"), ("positions", "persistent"), ("temperature", 0.1))}
    cfg.hidrop = hidrop_defaults(name, **keep, **fields)
    schedule_of(cfg)
    return cfg


def apply_schedule(cfg, value: str):
    """`--schedule VALUE` of evaluate/generate: a preset name, or a JSON file holding the layout
    fields (`analyze` writes one as schedule.json; its report.json works too)."""
    if value in PRESETS:
        return with_schedule(cfg, value)
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--schedule {value!r} is neither a preset {PRESETS} nor a JSON file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--schedule {path}: not JSON ({e})") from None
    d = d.get("proposal", d) if isinstance(d, dict) else {}
    fields = {k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in SCHEDULE_FIELDS if k in d}
    if not fields:
        raise ValueError(f"--schedule {path}: it holds none of the schedule fields {SCHEDULE_FIELDS}")
    return with_schedule(cfg, "vanilla", **fields)


def resolved(cfg) -> ml_collections.ConfigDict:
    """A copy of `cfg` with every schedule field explicit (what a run or export records: it must
    not change meaning if presets are retuned later)."""
    s = schedule_of(cfg)
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.hidrop = hidrop_defaults(cfg.hidrop.get("name", "vanilla"), selection=s.selection,
                                 positions=s.positions, temperature=s.temperature,
                                 inject_layer=s.inject_layer, prune_after=s.prune_after,
                                 keep=s.keep, exit_layer=s.exit)
    return out


def upgrade(cfg) -> ml_collections.ConfigDict:
    """A config read from disk, brought to today's fields (in place; returned). Configs written
    before presets were resolved lazily stored `exit_layer = None` for "no exit"."""
    h = cfg.get("hidrop")
    if h is not None:
        if h.get("inject_layer") is not None and h.get("exit_layer") is None:
            h.exit_layer = cfg.model.text.num_layers
        if h.get("name") not in PRESETS:
            h.name = "vanilla"  # every layout field is explicit: the base preset is irrelevant
        for k, d in (("positions", "persistent"), ("temperature", 0.1)):
            if k not in h:
                h[k] = d
    if "train" in cfg:  # fields added since the config was written take their defaults
        for k, v in train_defaults().items():
            if k not in cfg.train:
                cfg.train[k] = v
    return cfg


TRAINABLE = ("projector", "projector+llm", "all")


def train_defaults() -> dict:
    """`cfg.train`: LLaVA-1.5 stage-2 defaults; override with --config.train.FIELD=VALUE."""
    return dict(
        trainable="projector+llm",  # stage 1: "projector"; stage 2: "projector+llm"; "all"
        init_from="",  # start from: an `import-hf` checkpoint, a training workdir or a HF LLaVA dir
        init_vision="",  # a HF CLIP directory to start the vision tower from (LLaVA's --vision_tower)
        steps=1000, batch_size=128, grad_accum=1, lr=2e-5, warmup_steps=30, end_lr_ratio=0.0,
        weight_decay=0.0, b1=0.9, b2=0.999, clip=1.0, seed=0,
        mesh=(-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices
        log_every=10, eval_every=200, eval_batches=8, ckpt_every=200, keep_ckpts=3,
        async_ckpt=True,
        # a directory (local, or gs:// on a pod) for JAX's persistent compilation cache: a
        # relaunch finds its compiled step there instead of compiling again; "" = off
        compile_cache="",
        # a relaunch under another schedule or trainable set is refused unless this is True;
        # then the change is recorded in the workdir's history.jsonl
        allow_changes=False,
        # TFLOP/s per device that `mfu` is measured against; None = the chip's dense bf16 peak
        # (hidrop_jax.perf.CHIPS), no mfu where the chip is unknown (CPU). Typed, so that
        # --config.train.peak_tflops=459 can override the None default.
        peak_tflops=ml_collections.FieldReference(None, field_type=float),
        # (a, b): a jax.profiler trace of steps a..b-1 (0-based: the state's step before the
        # update) into <workdir>/profile, for TensorBoard or Perfetto
        profile_steps=ml_collections.FieldReference(None, field_type=tuple))


def validate_train(cfg) -> None:
    """Every training and data field, before anything is built or written: the field, the value
    and what is allowed."""
    t, d = cfg.train, cfg.data

    def need(field, ok, allowed):
        if not ok:
            value = t[field.split(".")[1]] if field.startswith("train.") else d[field.split(".")[1]]
            _fail(field, value, allowed)
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    need("train.trainable", t.trainable in TRAINABLE, f"one of {TRAINABLE}")
    need("train.lr", num(t.lr) and t.lr > 0, "a positive learning rate")
    for f in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every", "keep_ckpts"):
        need(f"train.{f}", isinstance(t[f], int) and t[f] > 0, "a positive int")
    need("train.warmup_steps", isinstance(t.warmup_steps, int) and t.warmup_steps >= 0, "an int ≥ 0")
    need("train.eval_batches", isinstance(t.eval_batches, int) and t.eval_batches >= 0, "an int ≥ 0")
    need("train.end_lr_ratio", num(t.end_lr_ratio) and 0 <= t.end_lr_ratio <= 1, "a float in [0, 1]")
    need("train.weight_decay", num(t.weight_decay) and t.weight_decay >= 0, "a float ≥ 0")
    need("train.b1", num(t.b1) and 0 <= t.b1 < 1, "a float in [0, 1)")
    need("train.b2", num(t.b2) and 0 <= t.b2 < 1, "a float in [0, 1)")
    need("train.clip", num(t.clip) and t.clip > 0, "a positive float (global-norm clipping)")
    need("train.batch_size", t.batch_size % t.grad_accum == 0,
         f"a multiple of train.grad_accum = {t.grad_accum}")
    need("train.mesh", len(t.mesh) == 3 and all(isinstance(x, int) and (x > 0 or x == -1) for x in t.mesh),
         "(data, fsdp, tensor): three positive ints, one of them may be -1")
    peak = t.peak_tflops
    need("train.peak_tflops", peak is None or (num(peak) and peak > 0),
         "None (the chip's bf16 peak from hidrop_jax.perf) or a positive float (TFLOP/s per device)")
    w = t.profile_steps
    need("train.profile_steps", w is None or (
        isinstance(w, (tuple, list)) and len(w) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in w) and 0 <= w[0] < w[1] <= t.steps),
         f"None or (a, b): steps a..b-1 to trace, ints with 0 <= a < b <= train.steps = {t.steps}")
    need("data.template", d.template in TEMPLATES, f"one of {TEMPLATES}")
    f = family(cfg.model)
    ok = f.chat_templates
    need("data.template", d.template in ok,
         f"{ok[0]!r} for a {f.title} model" if len(ok) == 1 else f"one of {ok} for a {f.title} model")
    need("data.max_len", isinstance(d.max_len, int) and d.max_len > 0, "a positive int (text rows)")
    need("data.num_queries", isinstance(d.num_queries, int) and d.num_queries >= 1, "an int ≥ 1")


def data_defaults() -> dict:
    """`cfg.data`: dataset spec (see hidrop_jax.data.sources), template and static shapes."""
    return dict(name="shapes_vqa", data_dir="", manual_dir="", tokenizer="", template="v1",
                max_len=128, num_queries=4, eval_split="validation")
