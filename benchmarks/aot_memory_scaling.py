"""Where a 7B train step's per-chip temporaries come from: the compiled memory of LLaVA-1.5-7B
stage 2 (`benchmarks/tpu_aot.py`'s settings, the real widths) at reduced depth, 1 and 2 rows per
chip, per schedule, on one slice (`hidrop_jax.aot` with the real TPU compiler).

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python benchmarks/aot_memory_scaling.py \\
        --cases 4:1,4:2,8:1,8:2 --schedules vanilla,tok64 --topology v5p:4x4x4
    python benchmarks/aot_memory_scaling.py --table

Depth changes only the number of decoder layers (the presets re-scale to it: Tok64 at 8 layers
injects at 2 and cuts after 2, 3, 4, exit 6); rows per chip change the global batch (rows ×
chips). A full 7B compile takes 20-30 min on 2 cores, a 4- or 8-layer one 3-7 min, so the
slopes (per layer, per row) come from here and are checked against the full-depth rows of
`tpu_aot.jsonl`. One JSON line per case; finished cases are skipped. Rows compiled before the
one-layer remat fix (`layers.common.stacked`, 2026-12-07) are in
`aot_memory_scaling_before_remat_fix.jsonl`: they overstate what HiDrop's one-layer segments
(and vanilla's injection layer) hold, which is also why depth 2 "compiled differently" then.
A slope is a reading of what each compile chose, not a need: where HBM is free the compiler
uses more (7B vanilla on v5e: 12.72 GiB of temporaries at 5 rows, 11.91 at 8), so a batch's
fit is `tpu_aot.py --max-batch`'s question, never this extrapolation's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks.tpu_aot import config, done_rows  # noqa: E402
from hidrop_jax import aot  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "aot_memory_scaling.jsonl")
GIB = 2 ** 30


def key(r: dict) -> tuple:
    # what was compiled (`attention_impl`); rows from before that field were all XLA attention
    return (r["topology"], r["schedule"], r["layers"], r["rows"], r.get("attention_impl") or r.get("attention") or "xla")


def measure(cases, schedules, topology: str, out: str, attention: str = "xla") -> None:
    chips = math.prod(int(x) for x in topology.split(":")[1].split("x"))
    seen = {key(r) for r in done_rows(out)}
    for name in schedules:
        for layers, rows in cases:
            if (topology, name, layers, rows, attention) in seen:
                continue
            cfg = config("7b", "s2", name)
            cfg.model.text.num_layers = layers
            cfg.train.batch_size = rows * chips
            cfg.model.attention_impl = attention  # never None: that is the TPU default, the kernel
            t0 = time.time()
            r = aot.run(cfg, topology, "train", flops="none", log=lambda s: print(s, flush=True),
                        retry_oom=False)
            r.update(layers=layers, rows=rows, attention=attention, wall_s=round(time.time() - t0, 1))
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(table(out), flush=True)


def table(path: str) -> str:
    rows = sorted(done_rows(path), key=key)
    lines = ["| slice | schedule | attention | layers | rows/chip | argument | temp | total / chip | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bytes_per_device"] or {}
        g = lambda k: f"{b[k] / GIB:.2f} GiB" if k in b else "—"  # noqa: E731
        lines.append(f"| {r['topology']} | {r['schedule']} | {key(r)[4]} | {r['layers']} | {r['rows']} | {g('argument')} "
                     f"| {g('temp')} | {g('total')} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="4:1,4:2,8:1,8:2", help="LAYERS:ROWS_PER_CHIP, comma-separated")
    ap.add_argument("--schedules", default="vanilla,tok64")
    ap.add_argument("--topology", default="v5p:4x4x4")
    ap.add_argument("--attention", default="xla", choices=("xla", "pallas"),
                    help="model.attention_impl (pallas: the flash kernel, causal + segment ids)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    a = ap.parse_args(argv)
    if not a.table:
        cases = [tuple(int(x) for x in c.split(":")) for c in a.cases.split(",")]
        measure(cases, a.schedules.split(","), a.topology, a.out, a.attention)
    print(table(a.out))


if __name__ == "__main__":
    main()
