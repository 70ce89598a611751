"""Schedules: the paper's numbers (DESIGN §1), validation messages, rescaled presets."""

import importlib

import pytest

from absl import flags
from ml_collections import config_flags

from hidrop_jax.config import resolved, schedule_of, upgrade
from hidrop_jax.hidrop.schedule import PRESETS, Schedule, preset, vision_flops

# Vision tokens per 0-based layer for Tok64, written out from DESIGN §1 (not from the code).
TOK64_LAYERS = [0] * 8 + [576] * 2 + [215] * 4 + [10] * 2 + [5] * 2 + [1] * 6 + [0] * 8


def test_tok64_tokens_per_layer():
    assert preset("tok64").tokens_per_layer() == TOK64_LAYERS


@pytest.mark.parametrize("name,mean", [("vanilla", 576), ("tok64", 64), ("tok48", 48),
                                        ("pdrop", 270), ("fastv", (2 * 576 + 30 * 288) / 32)])
def test_mean_tokens(name, mean):
    assert preset(name).mean_tokens() == pytest.approx(mean)


def test_tok80_mean_is_80():
    assert preset("tok80").mean_tokens() == pytest.approx(80, abs=0.05)


@pytest.mark.parametrize("name,tflops", [("vanilla", 3.82), ("pdrop", 1.78), ("tok64", 0.42)])
def test_paper_flops(name, tflops):
    """The paper's TFLOPs over the vision tokens of LLaVA-1.5-7B (d=4096, m=11008)."""
    assert vision_flops(preset(name), 4096, 11008) / 1e12 == pytest.approx(tflops, abs=0.005)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("layers,tokens", [(32, 576), (40, 576), (8, 576), (8, 16), (4, 16)])
def test_rescaled_presets_are_valid_and_concave(name, layers, tokens):
    s = preset(name, layers, tokens)  # validated on construction
    assert len(s.tokens_per_layer()) == layers
    assert all(a > b for a, b in zip(s.keep, s.keep[1:]))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(inject_layer=32), "hidrop.inject_layer = 32"),
    (dict(inject_layer=-1), "hidrop.inject_layer = -1"),
    (dict(inject_layer=8, exit_layer=8), "hidrop.exit_layer = 8"),
    (dict(exit_layer=33), "hidrop.exit_layer = 33"),
    (dict(prune_after=(5, 3), keep=(100, 10)), r"hidrop.prune_after\[1\] = 3"),
    (dict(inject_layer=8, prune_after=(4,), keep=(10,)), r"hidrop.prune_after\[0\] = 4"),
    (dict(prune_after=(31,), keep=(10,)), r"hidrop.prune_after\[0\] = 31"),
    (dict(prune_after=(3, 5), keep=(10, 10)), r"hidrop.keep\[1\] = 10"),
    (dict(prune_after=(3,), keep=(577,)), r"hidrop.keep\[0\] = 577.*576 tokens available"),
    (dict(prune_after=(3,), keep=(0,)), r"hidrop.keep\[0\] = 0"),
    (dict(prune_after=(3, 5), keep=(10,)), "hidrop.keep = \\(10,\\)"),
    (dict(selection="soft"), "hidrop.selection = 'soft'.*hard"),
    (dict(positions="relative"), "hidrop.positions = 'relative'"),
])
def test_bad_schedules_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Schedule(num_layers=32, n_vision=576, **kwargs)


def test_config_arg_strings():
    cfg = importlib.import_module("configs.llava15_7b").get_config("schedule=tok64,selection=relaxed")
    s = schedule_of(cfg)
    assert (s.inject_layer, s.prune_after, s.keep, s.exit_layer, s.selection) == (
        8, (9, 13, 15, 17), (215, 10, 5, 1), 24, "relaxed")
    with pytest.raises(ValueError, match="hidrop schedule 'tok99' is unknown"):
        importlib.import_module("configs.llava15_7b").get_config("schedule=tok99")
    with pytest.raises(ValueError, match="config arg `shedule` is unknown"):
        importlib.import_module("configs.llava15_7b").get_config("shedule=tok64")


def _cli_config(*argv):
    """The config as `python -m hidrop_jax.train` parses it: the file's args, then overrides."""
    argv = ["prog", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False, sys_argv=argv)
    fv(argv)
    return fv.config


def test_presets_resolve_after_overrides():
    """A preset follows the model the overrides make (it used to be fixed inside get_config)."""
    cfg = _cli_config("--config=configs/llava15_7b.py:schedule=tok64", "--config.model.text.num_layers=6")
    assert schedule_of(cfg) == preset("tok64", 6, 576)
    cfg = _cli_config("--config=configs/llava15_7b.py", "--config.model.vision.image_size=168")
    assert schedule_of(cfg).n_vision == 144 and schedule_of(cfg).tokens_per_layer() == [144] * 32
    cfg = _cli_config("--config=configs/llava15_7b.py:schedule=tok64", "--config.hidrop.name=tok48")
    assert schedule_of(cfg).keep == (87, 10, 5, 1)


def test_explicit_fields_override_the_preset():
    cfg = _cli_config("--config=configs/llava15_7b.py:schedule=tok64",
                      "--config.hidrop.keep=(100,10,5,1)", "--config.hidrop.exit_layer=32")
    s = schedule_of(cfg)
    assert (s.inject_layer, s.prune_after, s.keep, s.exit) == (8, (9, 13, 15, 17), (100, 10, 5, 1), 32)
    cfg = _cli_config("--config=configs/llava15_7b.py:schedule=tok64", "--config.hidrop.keep=(700,10,5,1)")
    with pytest.raises(ValueError, match=r"hidrop.keep\[0\] = 700"):
        schedule_of(cfg)


def test_resolved_config_keeps_its_meaning():
    """What a run records is explicit: reading it back gives the same schedule, also for a
    config stored before presets were resolved lazily (exit_layer None meant "no exit")."""
    import json

    import ml_collections
    cfg = importlib.import_module("configs.llava15_7b").get_config("schedule=tok64")
    back = upgrade(ml_collections.ConfigDict(json.loads(resolved(cfg).to_json())))
    assert schedule_of(back) == schedule_of(cfg)
    old = json.loads(resolved(cfg).to_json())
    old["hidrop"].update(exit_layer=None, name="custom")
    assert schedule_of(upgrade(ml_collections.ConfigDict(old))).exit == 32
