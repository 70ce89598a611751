"""The HiDrop schedule in an exported Hugging Face directory, runnable by transformers.

`add_hidrop_code` copies the family's modeling file (`modeling_hidrop_llava.py` or
`modeling_hidrop_qwen2_5_vl.py`) and the method they share (`hidrop_torch.py`, imported
relatively; all three need only torch + transformers) beside the weights and points
`config.json`'s `auto_map` at it, with the schedule as `config.hidrop`, so

    AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)

runs late injection, the cuts and the exit as the model was trained, while `model_type` stays the
family's and plain `LlavaForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration
.from_pretrained(out)` still loads it (vanilla).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hidrop_jax.config import schedule_of
from hidrop_jax.families import FAMILIES, family_name

_HERE = Path(__file__).parent
HELPER_FILE = _HERE / "hidrop_torch.py"


def modeling_file(family: str) -> Path:
    """The modeling file of a family (`Family.remote_code`: file, config class, model class)."""
    return _HERE / FAMILIES[family].remote_code[0]


def auto_map(family: str) -> dict:
    file, config_class, model_class = FAMILIES[family].remote_code
    module = file[:-len(".py")]
    return {"AutoConfig": f"{module}.{config_class}",
            "AutoModelForImageTextToText": f"{module}.{model_class}"}


MODELING_FILE = modeling_file("llava")
AUTO_MAP = auto_map("llava")


def hidrop_fields(cfg):
    """`config.hidrop` for `cfg.hidrop`, or None when the schedule is vanilla (nothing to run).
    Keep entries are counts at the config's token count, except those given as fractions,
    which stay fractions (Qwen2.5-VL's token count follows each image)."""
    if "hidrop" not in cfg:
        return None
    s = schedule_of(cfg)
    if s.inject_layer == 0 and not s.prune_after and s.exit == s.num_layers:
        return None
    if s.positions != "persistent":
        raise ValueError(f"hidrop.positions = {s.positions!r} cannot be exported as code; allowed: "
                         "'persistent' (or export without it: hidrop_code=False / --no-hidrop-code)")
    given = cfg.hidrop.get("keep")
    keep = [g if given is not None and isinstance(g, float) and not float(g).is_integer() else c
            for g, c in zip(given if given is not None else s.keep, s.keep)]
    return dict(name=cfg.hidrop.name, inject_layer=s.inject_layer,
                prune_after=list(s.prune_after), keep=keep, exit_layer=s.exit_layer,
                selection=s.selection, positions=s.positions, temperature=s.temperature)


def add_hidrop_code(out_dir, cfg, hf_config: dict) -> dict:
    """Writes the modeling files into `out_dir` and adds `auto_map` + `hidrop` to `hf_config`
    (in place, and returned) when `cfg`'s schedule is not vanilla; else changes nothing."""
    fields = hidrop_fields(cfg)
    if fields is not None:
        family = family_name(cfg.model)
        for f in (modeling_file(family), HELPER_FILE):
            shutil.copyfile(f, Path(out_dir) / f.name)
        hf_config.update(auto_map=auto_map(family), hidrop=fields)
    return hf_config
