"""Model families: what differs between LLaVA and Qwen2.5-VL behind one small interface.

A family supplies the vision tower + projector (init, encode), the rotary rows of its position
layout, the adapter from Hugging Face-style batches to `model.Inputs`, its image preprocessing,
tokens and chat templates, and the facts reports and exports need. The HiDrop wiring in
`model.py` (inject, stages, cuts, exit, per-stage caches) is shared. Order (masks, causality,
scoring) and rotation are separate: `Inputs.text_pos` and `image_slot + index` give the order;
`Inputs.text_rope` / `vision_rope` (None for LLaVA: rotation = order) the rotation.

Everything outside `families/` asks `family(cfg.model)` (or `FAMILIES[name]`) and never tests a
family's name. `Family` (`families.base`) is a frozen dataclass of functions and constants rather
than a `typing.Protocol` over modules: its constructor fails the moment a member is missing,
`dataclasses.fields(Family)` lists the interface for the test that checks every family, and a
variant is one `dataclasses.replace` (tests register a toy family that way).

The HF mapping is not a member: `hf.mapping` needs `config`, which needs this registry, so a
family's mapping module registers itself one level up, in `hf.load.MAPPINGS`.

Adding a family (Qwen3-VL, Gemma3, LLaVA-NeXT):
  1. `families/<name>.py`: `NAME`, `model_config(...)` (builds and validates `cfg.model` with
     `family=NAME`), the functions the `Family` members name (layers go in `layers/`, knowing
     nothing of HiDrop), and `FAMILY = Family(...)` at the bottom; add it to `FAMILIES` below.
     `rope_rows=None` if tokens rotate by their order.
  2. `hf/<name>_mapping.py` with the members `hf.load.MAPPINGS` lists (`FAMILY`, `MODEL_TYPE`,
     `TABLE`, `canonical_name`, `to_ours`, `to_hf`, `expected_tensors`, `config_from_hf`,
     `config_to_hf`, `write_processor`) and its entry in `MAPPINGS`; a HiDrop modeling file
     `hf/modeling_hidrop_<name>.py` (torch + transformers only, importing `hidrop_torch`) named
     by `remote_code`. Put both in `tests/test_structure.py`'s ORDER beside their LLaVA twins
     (`families/*` is covered by its prefix).
  3. `configs/<name>_*.py` with the real sizes; a chat template in `data/templates.py`.
  4. Tests: `tests/test_families.py` checks the members of every registered family; add a tiny
     random HF model (`tests/hf_tiny_<name>.py`) and parity against PyTorch as
     `tests/test_qwen25vl.py` does (logits, vision features, export round trip).
"""

from hidrop_jax.families import llava, qwen2_5_vl
from hidrop_jax.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (llava.FAMILY, qwen2_5_vl.FAMILY)}


def family_name(m) -> str:
    """`cfg.model.family`; configs written before the field existed are LLaVA."""
    name = m.get("family", "llava")
    if name not in FAMILIES:
        raise ValueError(f"config field `model.family` = {name!r} is not supported; allowed: "
                         f"one of {tuple(FAMILIES)}")
    return name


def family(m) -> Family:
    """The `Family` of `m` = `cfg.model`."""
    return FAMILIES[family_name(m)]
