"""The HiDrop schedule in an exported Hugging Face directory, runnable by transformers.

`add_hidrop_code` copies `modeling_hidrop_llava.py` (self-contained: torch + transformers) beside
the weights and points `config.json`'s `auto_map` at it, with the schedule as `config.hidrop`, so

    AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)

runs late injection, the cuts and the exit as the model was trained, while `model_type` stays
"llava" and plain `LlavaForConditionalGeneration.from_pretrained(out)` still loads it (vanilla).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hidrop_jax.config import schedule_of

MODELING_FILE = Path(__file__).with_name("modeling_hidrop_llava.py")
AUTO_MAP = {
    "AutoConfig": "modeling_hidrop_llava.HiDropLlavaConfig",
    "AutoModelForImageTextToText": "modeling_hidrop_llava.HiDropLlavaForConditionalGeneration",
}


def hidrop_fields(cfg):
    """`config.hidrop` for `cfg.hidrop`, or None when the schedule is vanilla (nothing to run)."""
    if "hidrop" not in cfg:
        return None
    s = schedule_of(cfg)
    if s.inject_layer == 0 and not s.prune_after and s.exit == s.num_layers:
        return None
    if s.positions != "persistent":
        raise ValueError(f"hidrop.positions = {s.positions!r} cannot be exported as code; allowed: "
                         "'persistent' (or export without it: hidrop_code=False / --no-hidrop-code)")
    return dict(name=cfg.hidrop.name, inject_layer=s.inject_layer,
                prune_after=list(s.prune_after), keep=list(s.keep), exit_layer=s.exit_layer,
                selection=s.selection, positions=s.positions, temperature=s.temperature)


def add_hidrop_code(out_dir, cfg, hf_config: dict) -> dict:
    """Writes the modeling file into `out_dir` and adds `auto_map` + `hidrop` to `hf_config`
    (in place, and returned) when `cfg`'s schedule is not vanilla; else changes nothing."""
    fields = hidrop_fields(cfg)
    if fields is not None:
        shutil.copyfile(MODELING_FILE, Path(out_dir) / MODELING_FILE.name)
        hf_config.update(auto_map=dict(AUTO_MAP), hidrop=fields)
    return hf_config
