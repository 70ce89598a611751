"""A config whose model comes from a directory: an `import-hf` checkpoint, a training workdir or
a Hugging Face LLaVA directory. Any size of LLaVA trains without a dozen overrides, and the
HiDrop presets scale to its depth and token count.

    --config configs/from_checkpoint.py:path=DIR[,schedule=tok64,dtype=bfloat16,remat=full]

`train.init_from` defaults to DIR (start from its weights: a workdir's latest step). Training
and data settings are `hidrop_jax.config`'s defaults (LLaVA-1.5 stage 2); set them with
`--config.train.*` and `--config.data.*`.
"""

from hidrop_jax.checkpoint import read_config
from hidrop_jax.config import make_config, model_from_dict


def get_config(arg: str = ""):
    path = dict(kv.partition("=")[::2] for kv in arg.split(",") if kv.strip()).get("path", "")
    if not path:
        raise ValueError("configs/from_checkpoint.py needs path=DIR (an import-hf checkpoint, a "
                         "training workdir or a Hugging Face LLaVA directory), e.g. "
                         "--config configs/from_checkpoint.py:path=/ckpt/llava,schedule=tok64")
    cfg = make_config(model_from_dict(read_config(path).model), arg, path="")
    cfg.train.init_from = path
    return cfg
