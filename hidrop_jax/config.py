"""Model configuration: one `ml_collections.ConfigDict` per model, validated early.

`cfg.model` mirrors the Hugging Face LLaVA config (vision / text / projector) with our own field
names; `cfg.hidrop` holds the HiDrop schedule (see `hidrop_jax.hidrop.schedule`). Layers never
read this dict: `hidrop_jax.layers` take small frozen dataclasses built from it here.
"""

from __future__ import annotations

import ml_collections

from hidrop_jax.layers.common import INIT_STD

VISION_ACTS = ("quick_gelu", "gelu")
PROJECTOR_ACTS = ("gelu",)
TEXT_ACTS = ("silu",)
STRATEGIES = ("default", "full")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "minimal", "full")
ATTENTION_IMPLS = (None, "xla", "cudnn", "pallas")


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
        # jax.nn.dot_product_attention's implementation: None = XLA picks (cuDNN on GPU when the
        # shapes allow), "xla", or "cudnn" (fails loudly where unsupported); "pallas" = the TPU
        # flash kernel (hidrop_jax.layers.attention). Typed so that
        # --config.model.attention_impl=cudnn can override the None default.
        attention_impl=ml_collections.FieldReference(attention_impl, field_type=str),
    ))
    validate_model(m)
    return m


def _fail(field: str, value, allowed: str):
    raise ValueError(f"config field `{field}` = {value!r} is not supported; allowed: {allowed}")


def validate_model(m: ml_collections.ConfigDict) -> None:
    """Fails naming the field, the value and what is allowed."""
    v, t = m.vision, m.text
    if v.hidden_act not in VISION_ACTS:
        _fail("model.vision.hidden_act", v.hidden_act, f"one of {VISION_ACTS}")
    if t.hidden_act not in TEXT_ACTS:
        _fail("model.text.hidden_act", t.hidden_act, f"one of {TEXT_ACTS}")
    if m.projector.hidden_act not in PROJECTOR_ACTS:
        _fail("model.projector.hidden_act", m.projector.hidden_act, f"one of {PROJECTOR_ACTS}")
    if m.select_strategy not in STRATEGIES:
        _fail("model.select_strategy", m.select_strategy, f"one of {STRATEGIES}")
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"one of {DTYPES}")
    if m.get("attention_impl") not in ATTENTION_IMPLS:
        _fail("model.attention_impl", m.attention_impl, f"one of {ATTENTION_IMPLS}")
    if m.remat not in REMAT_POLICIES:
        _fail("model.remat", m.remat, f"one of {REMAT_POLICIES}")
    fl = m.feature_layer
    if not isinstance(fl, int) or not -v.num_layers - 1 <= fl <= v.num_layers or fl == 0:
        _fail("model.feature_layer", fl,
              f"a single int in [-{v.num_layers + 1}, {v.num_layers}] except 0 "
              "(an index into CLIP's hidden states; lists of layers are not supported)")
    if v.image_size % v.patch_size:
        _fail("model.vision.image_size", v.image_size, f"a multiple of patch_size={v.patch_size}")
    if t.num_heads % t.num_kv_heads:
        _fail("model.text.num_kv_heads", t.num_kv_heads, f"a divisor of num_heads={t.num_heads}")
    if v.hidden_size % v.num_heads:
        _fail("model.vision.num_heads", v.num_heads, f"a divisor of hidden_size={v.hidden_size}")
    if not initializer_range(t) > 0:
        _fail("model.text.initializer_range", t.initializer_range, "a positive float (the std of "
              "the LLM's and projector's weights at initialisation)")
    if t.head_dim % 2:
        _fail("model.text.head_dim", t.head_dim, "an even number (RoPE rotates pairs)")


def initializer_range(text: ml_collections.ConfigDict) -> float:
    """`model.text.initializer_range`; configs written before the field existed mean HF's 0.02."""
    return text.get("initializer_range", INIT_STD)


def feature_layers_run(m: ml_collections.ConfigDict) -> int:
    """How many CLIP encoder layers must run to produce `feature_layer`'s hidden state."""
    fl = m.feature_layer
    return fl if fl >= 0 else m.vision.num_layers + 1 + fl


def n_vision_tokens(m: ml_collections.ConfigDict) -> int:
    """Vision tokens per image fed to the LLM (CLS dropped for strategy `default`)."""
    n = (m.vision.image_size // m.vision.patch_size) ** 2
    return n if m.select_strategy == "default" else n + 1


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
    from hidrop_jax.hidrop.schedule import hidrop_config
    a = parse_arg(arg, dict(schedule="vanilla", selection="hard", positions="persistent",
                            dtype=model.dtype, remat=model.remat, unroll=False, **extra))
    model.dtype, model.remat, model.scan_unroll = a.dtype, a.remat, a.unroll
    validate_model(model)
    cfg = ml_collections.ConfigDict(dict(model=model, arg=a, train=train_defaults(), data=data_defaults()))
    cfg.hidrop = hidrop_config(a.schedule, model.text.num_layers, n_vision_tokens(model),
                               selection=a.selection, positions=a.positions)
    return cfg


TRAINABLE = ("projector", "projector+llm", "all")


def train_defaults() -> dict:
    """`cfg.train`: LLaVA-1.5 stage-2 defaults; override with --config.train.FIELD=VALUE."""
    return dict(
        trainable="projector+llm",  # stage 1: "projector"; stage 2: "projector+llm"; "all"
        init_vision="",  # a HF CLIP directory to start the vision tower from (LLaVA's --vision_tower)
        steps=1000, batch_size=128, grad_accum=1, lr=2e-5, warmup_steps=30, end_lr_ratio=0.0,
        weight_decay=0.0, b1=0.9, b2=0.999, clip=1.0, seed=0,
        mesh=(-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices
        log_every=10, eval_every=200, eval_batches=8, ckpt_every=200, keep_ckpts=3,
        async_ckpt=True)


def data_defaults() -> dict:
    """`cfg.data`: dataset spec (see hidrop_jax.data.sources), template and static shapes."""
    return dict(name="shapes_vqa", data_dir="", manual_dir="", tokenizer="", template="v1",
                max_len=128, num_queries=4, eval_split="validation")
