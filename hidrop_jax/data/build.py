"""Build a dataset once, before training (CLI): every split is written as ArrayRecord files in
`--data-dir`, which all training processes then read at random.

    python -m hidrop_jax.data.build SPEC --data-dir DIR [--manual-dir DIR]

SPEC is what `--config.data.name` takes (see `hidrop_jax.data.sources`), e.g.
`llava_json:json_file=llava_v1_5_mix665k.json,num_validation=1000`. Building once on one host
matters on a multi-host run: otherwise every process would start the same build on the shared
`data_dir`. A dataset already built there is reused. Prints the examples per split and the
records skipped (per reason, with example ids), which `llava_json` keeps in its metadata.
"""

from __future__ import annotations

import argparse

from hidrop_jax import cli
from hidrop_jax.data.sources import make_builder, prepare


def summary(builder) -> str:
    info = builder.info
    splits = ", ".join(f"{name} {s.num_examples}" for name, s in sorted(info.splits.items()))
    line = f"{info.full_name} in {builder.data_dir_root}: {splits} examples"
    skipped = dict(info.metadata.get("skipped", {})) if info.metadata else {}
    if skipped:
        ids = info.metadata.get("skipped_ids", {})
        parts = [f"{k} {v}" + (f" {list(ids.get(k, []))}" if v else "") for k, v in skipped.items()]
        line += f"; skipped {sum(skipped.values())}: " + ", ".join(parts)
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.data.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="dataset spec, as --config.data.name")
    ap.add_argument("--data-dir", required=True, help="where the built dataset goes (data.data_dir)")
    ap.add_argument("--manual-dir", default="", help="the source files (data.manual_dir)")
    a = ap.parse_args(argv)
    builder = prepare(make_builder(a.spec, a.data_dir), a.manual_dir or None)
    print(summary(builder))
    return builder


if __name__ == "__main__":
    cli.run(main)
