"""What a run reads: its tokenizer, the batch spec and the train/eval sources (`open_data`).

The tokenizer is the first of: `data.tokenizer`; the workdir's `tokenizer/` (a resumed run);
the one beside `train.init_from` (an `import-hf` checkpoint, a workdir or a HF directory);
for shapes_vqa, one built from the generator's vocabulary. Whatever is used is kept in the
workdir's `tokenizer/`, so export and generation find it there.
"""

from __future__ import annotations

from pathlib import Path

import jax

from hidrop_jax.checkpoint import copy_tokenizer, find_tokenizer
from hidrop_jax.data.pipeline import TextImageSpec
from hidrop_jax.data.sources import data_dir_for, load_source
from hidrop_jax.data.tokenizer import load_tokenizer, shapes_vqa_tokenizer
from hidrop_jax.families import family


def open_data(cfg, workdir):
    """(tokenizer, spec, train source, eval source) for `cfg.data` and `cfg.model`."""
    d, workdir = cfg.data, Path(workdir)
    data_dir = data_dir_for(d.name, d.data_dir, workdir / "data")
    tok_dir = workdir / "tokenizer"
    lead = jax.process_index() == 0
    init_from = cfg.train.get("init_from") if "train" in cfg else None
    src = (find_tokenizer(workdir, explicit=d.tokenizer) if d.tokenizer else
           tok_dir if tok_dir.exists() else
           find_tokenizer(init_from) if init_from else None)
    if src is not None:
        tok = load_tokenizer(str(src))
        if lead and Path(src).absolute() != tok_dir.absolute() and not tok_dir.exists():
            copy_tokenizer(src, tok_dir)
    elif d.name.startswith("shapes_vqa"):
        tok = shapes_vqa_tokenizer(str(tok_dir) if lead else None, family=family(cfg.model).name)
    else:
        raise ValueError(f"data.tokenizer is empty and no tokenizer lies beside train.init_from="
                         f"{init_from!r}; dataset {d.name!r} needs a tokenizer directory")
    if len(tok) > cfg.model.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens; model.text.vocab_size is "
                         f"{cfg.model.text.vocab_size}")
    check_special_tokens(cfg.model, tok)
    spec = TextImageSpec.for_model(cfg.model, template=d.template, max_len=d.max_len,
                                   num_queries=d.num_queries)
    manual = d.manual_dir or None
    train = load_source(d.name, "train", data_dir, manual_dir=manual)
    evals = load_source(d.name, d.eval_split, data_dir, manual_dir=manual)
    return tok, spec, train, evals


def check_special_tokens(m, tok) -> None:
    """The model's special-token ids (the family's `token_fields`) must be the tokenizer's ids
    of those tokens."""
    for field, token in family(m).token_fields:
        got = tok.convert_tokens_to_ids(token)
        if got != m[field]:
            raise ValueError(f"model.{field} = {m[field]}, but the tokenizer's {token} is {got}")
