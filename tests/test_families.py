"""The model-family seam: every registered family implements the whole `Family` interface, an
unknown family fails naming the field, and a third family registered at test time runs through
`model.py` without any edit there (what "a small addition" means)."""

import dataclasses
import re
import typing
from pathlib import Path

import jax
import numpy as np
import pytest

from hidrop_jax import families
from hidrop_jax.config import make_config, model_config, validate_model
from hidrop_jax.data.templates import TEMPLATES
from hidrop_jax.families import FAMILIES, Family, family, family_name, llava
from hidrop_jax.families.base import fail
from hidrop_jax.hf.load import MAPPINGS
from hidrop_jax.model import abstract_params, forward_hf, init_params

PKG = Path(__file__).resolve().parents[1] / "hidrop_jax"
MAPPING_MEMBERS = ("FAMILY", "MODEL_TYPE", "TABLE", "canonical_name", "to_ours", "to_hf",
                   "expected_tensors", "config_from_hf", "config_to_hf", "write_processor")


def _tiny(family_field=None, **vision):
    v = dict(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32, num_layers=2,
             num_heads=2)
    v.update(vision)
    m = model_config(vision=v, text=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_layers=3, num_heads=4, num_kv_heads=2),
                     image_token_id=3)
    if family_field is not None:
        m.family = family_field
    return m


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_implements_every_member(name):
    f = FAMILIES[name]
    hints = typing.get_type_hints(Family)
    for field in dataclasses.fields(Family):
        value, hint = getattr(f, field.name), hints[field.name]
        optional = type(None) in typing.get_args(hint)
        if value is None:
            assert optional, f"{name}: Family.{field.name} is None but not optional"
            continue
        base = typing.get_origin(hint) or hint
        if base is typing.Union:  # Optional[X]: check X
            base = typing.get_origin(typing.get_args(hint)[0]) or typing.get_args(hint)[0]
        if base is typing.get_origin(typing.Callable[..., None]):
            assert callable(value), f"{name}: Family.{field.name} = {value!r} is not callable"
        else:
            assert isinstance(value, base), f"{name}: Family.{field.name} = {value!r} is not a {base}"
    assert f.name == name and f.title
    assert f.default_template in f.chat_templates and set(f.chat_templates) <= set(TEMPLATES)
    specials = set(f.special_tokens)
    assert {tok for _, tok in f.token_fields} <= specials  # the word-level tokenizer has them
    roles = [f.token_roles[k] for k in ("bos_token", "eos_token", "pad_token") if k in f.token_roles]
    assert set(roles + list(f.token_roles.get("additional_special_tokens", []))) <= specials
    assert (PKG / "hf" / f.remote_code[0]).is_file()
    # its HF mapping module, registered one level up
    mp = MAPPINGS.get(name)
    assert mp is not None, f"family {name!r} has no HF mapping in hf.load.MAPPINGS"
    missing = [a for a in MAPPING_MEMBERS if not hasattr(mp, a)]
    assert not missing and mp.FAMILY == name, (mp.__name__, missing)


def test_every_member_is_used_outside_the_families():
    """The interface holds what call sites need, nothing invented: each member is read as
    `.member` somewhere in the package outside `families/`."""
    code = "\n".join(p.read_text() for p in PKG.rglob("*.py") if "families" not in p.parts)
    unused = [f.name for f in dataclasses.fields(Family)
              if f.name != "name" and not re.search(rf"\.{f.name}\b", code)]
    assert not unused, f"Family members no call site reads: {unused}"


def test_no_call_site_tests_a_family_by_name():
    pattern = re.compile(r"""[!=]= ["'](llava|qwen2_5_vl)["']""")
    hits = [f"{p.relative_to(PKG)}:{i + 1}" for p in PKG.rglob("*.py") if "families" not in p.parts
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not hits, hits


def test_unknown_family_fails_naming_the_field():
    m = _tiny("gemma3")
    for call in (family, family_name, validate_model):
        with pytest.raises(ValueError, match=r"`model.family` = 'gemma3' .*allowed: .*'llava', 'qwen2_5_vl'"):
            call(m)
    assert family(_tiny()) is FAMILIES["llava"]  # configs written before the field: LLaVA


def _toy_validate(m):
    """LLaVA's checks plus one of the toy's own (so the test sees which validate ran)."""
    llava.validate(m)
    if m.vision.num_layers > 2:
        fail("model.vision.num_layers", m.vision.num_layers, "at most 2 for the toy family")


def test_a_third_family_runs_without_edits_to_model_py(monkeypatch):
    toy = dataclasses.replace(FAMILIES["llava"], name="toy", title="Toy", validate=_toy_validate)
    monkeypatch.setitem(FAMILIES, "toy", toy)
    assert families.family(_tiny("toy")) is toy
    with pytest.raises(ValueError, match=r"model.vision.num_layers.*at most 2 for the toy"):
        validate_model(_tiny("toy", num_layers=3))

    cfgs = {name: make_config(_tiny(name)) for name in ("llava", "toy")}
    n = 4  # (28 / 14)² tokens
    rng = np.random.default_rng(0)
    ids = np.array([[1, 5, 6] + [3] * n + [7, 8], [1, 9, 10, 11, 0, 0, 0, 0, 0]])
    mask = np.array([[1] * 9, [1] * 4 + [0] * 5])
    pixels = rng.normal(size=(1, 28, 28, 3)).astype(np.float32)  # one image, sample 0's
    params = init_params(cfgs["toy"], jax.random.PRNGKey(0))
    shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
    assert shapes(params) == shapes(abstract_params(cfgs["llava"]))
    out = {name: np.asarray(forward_hf(cfg, params, ids, pixels, mask)) for name, cfg in cfgs.items()}
    assert out["toy"].shape == (2, 9 - n, 64) and np.isfinite(out["toy"]).all()
    # the same functions under another name: the same logits (no by-name branch on the way)
    np.testing.assert_array_equal(out["toy"], out["llava"])
