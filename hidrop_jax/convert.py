"""Weight exchange with Hugging Face LLaVA checkpoints: the command line, and the stable API.

    python -m hidrop_jax.convert import-hf HF_DIR OUT_DIR [--overwrite]
    python -m hidrop_jax.convert export-hf RUN OUT_DIR [--step N] [--tokenizer DIR] [--overwrite]
                                             [--no-hidrop-code]

`import-hf` writes our checkpoint (`config.json` + orbax `params/`, and the HF directory's
tokenizer under `tokenizer/`), which `train.init_from` and every command read. `export-hf` takes
a checkpoint, a training workdir (its latest step, or `--step`) or a HF directory. The mapping
lives in `hidrop_jax.hf` (`mapping`, `load`, `save`); `load_hf` and `save_hf` are re-exported
here, where users have always imported them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hidrop_jax import cli
from hidrop_jax.atomic import check_out_dir
from hidrop_jax.checkpoint import (find_tokenizer, load_checkpoint, open_run, save_checkpoint)
from hidrop_jax.data.tokenizer import load_tokenizer
from hidrop_jax.hf.load import load_hf, load_hf_vision, read_run_facts
from hidrop_jax.hf.mapping import canonical_name, config_from_hf, config_to_hf
from hidrop_jax.hf.save import DEFAULT_MAX_SHARD_BYTES, save_hf, save_hf_vision
from hidrop_jax.model import count_params

__all__ = ["load_hf", "load_hf_vision", "save_hf", "save_hf_vision", "load_checkpoint",
           "save_checkpoint", "canonical_name", "config_from_hf", "config_to_hf", "main"]


def _size(s: str) -> int:
    """'2GB', '500MB', '123' (bytes) -> bytes (powers of 1024)."""
    s = s.strip().upper().removesuffix("B")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def import_hf(hf_dir, out_dir, *, overwrite: bool = False) -> None:
    check_out_dir(Path(out_dir).absolute(), overwrite)  # fail before reading weights
    cfg, params = load_hf(hf_dir)
    read_run_facts(hf_dir, cfg)  # our own export: its schedule and chat template come back
    save_checkpoint(out_dir, cfg, params, tokenizer_dir=find_tokenizer(hf_dir), overwrite=overwrite)
    print(f"imported {count_params(params):,} parameters from {hf_dir} -> {out_dir}")


def export_hf(run_dir, out_dir, *, step=None, tokenizer=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False, hidrop_code: bool = True) -> None:
    check_out_dir(Path(out_dir).absolute(), overwrite)  # fail before reading weights
    run = open_run(run_dir, step=step, check_shapes=False)
    tok_dir = find_tokenizer(run_dir, run.cfg, explicit=tokenizer)
    tok = load_tokenizer(str(tok_dir)) if tok_dir is not None else None
    out = save_hf(run.cfg, run.params, out_dir, tok, max_shard_bytes=max_shard_bytes,
                  overwrite=overwrite, hidrop_code=hidrop_code)
    at = f" (step {run.step})" if run.step is not None else ""
    print(f"exported {count_params(run.params):,} parameters from {run_dir}{at} -> {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-hf", help="HF LLaVA dir -> orbax checkpoint + config.json")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    exp = sub.add_parser("export-hf", help="checkpoint, training workdir or HF dir -> HF LLaVA dir")
    exp.add_argument("ckpt_dir", help="an import-hf checkpoint, a training workdir or a HF directory")
    exp.add_argument("out_dir")
    exp.add_argument("--step", type=int, help="a training workdir's step (default: its latest)")
    exp.add_argument("--tokenizer", help="a tokenizer directory (default: the one beside the "
                     "weights) to save with a CLIP image processor and a LlavaProcessor")
    exp.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_BYTES,
                     help="shard above this many bytes (e.g. 2GB, 500MB); default 2GB")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    exp.add_argument("--no-hidrop-code", dest="hidrop_code", action="store_false",
                     help="leave out the HiDrop modeling file and auto_map (the export then runs "
                     "as vanilla LLaVA in PyTorch)")
    args = ap.parse_args(argv)
    if args.cmd == "import-hf":
        import_hf(args.hf_dir, args.out_dir, overwrite=args.overwrite)
    else:
        export_hf(args.ckpt_dir, args.out_dir, step=args.step, tokenizer=args.tokenizer,
                  max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                  hidrop_code=args.hidrop_code)


if __name__ == "__main__":
    cli.run(main)
