"""Model families: what differs between LLaVA and Qwen2.5-VL behind one small interface.

A family supplies the vision tower + projector (init, encode), the rotary tables for its
position layout, and the adapter from Hugging Face-style batches to `model.Inputs`. The HiDrop
wiring in `model.py` (inject, stages, cuts, exit, per-stage caches) is shared. Order (masks,
causality, scoring) and rotation are separate: `Inputs.text_pos` and `image_slot + index` give
the order; `Inputs.text_rope` / `vision_rope` (None for LLaVA: rotation = order) the rotation.
"""

FAMILIES = ("llava", "qwen2_5_vl")


def family_name(m) -> str:
    """`cfg.model.family`; configs written before the field existed are LLaVA."""
    name = m.get("family", "llava")
    if name not in FAMILIES:
        raise ValueError(f"config field `model.family` = {name!r} is not supported; allowed: "
                         f"one of {FAMILIES}")
    return name
