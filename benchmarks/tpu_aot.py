"""LLaVA-1.5-7B/13B training compiled for 64-chip TPU slices on this CPU host: memory per chip,
the largest batch that fits, roofline step time per HiDrop schedule (`hidrop_jax.aot`).

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py            # all rows
    python benchmarks/tpu_aot.py --rows 7b:s2:v5p:4x4x4 --schedules vanilla,tok64 --max-batch
    python benchmarks/tpu_aot.py --table                                        # print only

Rows follow launch/README.md §5: stage 1 trains the projector (global batch 256, 128 text rows),
stage 2 the projector and the LLM (batch 128, 1,472 text rows); both bf16 compute over float32
master weights, `remat=full`, mesh (1, -1, 1) (FSDP over the slice). One image per sample.
Each compile runs the real TPU compiler (libtpu) on the production train step; see
`hidrop_jax.aot` for what every figure means. Results are appended to a JSON-lines file, one
row at a time, and finished rows are skipped on a rerun: 7B compiles take minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hidrop_jax import aot  # noqa: E402
from hidrop_jax.layers.attention import resolve  # noqa: E402

SCHEDULES = ("vanilla", "pdrop", "tok80", "tok64", "tok48")
MODELS = {"7b": "configs/llava15_7b.py", "13b": "configs/llava15_13b.py"}
STAGES = {  # launch/README.md §5
    "s1": dict(trainable="projector", batch_size=256, max_len=128),
    "s2": dict(trainable="projector+llm", batch_size=128, max_len=1472),
}
TOPOLOGIES = ("v5p:4x4x4", "v5e:8x8", "v4:4x4x4", "v6e:8x8")
# most important first: 7B stage 2 on v5p and v5e, then the rest
DEFAULT_ROWS = ([f"7b:s2:{t}" for t in ("v5p:4x4x4", "v5e:8x8")]
                + [f"7b:s1:{t}" for t in ("v5p:4x4x4", "v5e:8x8")]
                + [f"{m}:{s}:{t}" for m in ("7b", "13b") for s in ("s2", "s1") for t in TOPOLOGIES
                   if not (m == "7b" and t in ("v5p:4x4x4", "v5e:8x8"))])
OUT = os.path.join(ROOT, "benchmarks", "results", "tpu_aot.jsonl")


def config(model: str, stage: str, schedule: str, remat: str = "full", mesh=(1, -1, 1), attention=None):
    from benchmarks.flops import load_config
    cfg = load_config(os.path.join(ROOT, MODELS[model]), f"schedule={schedule},dtype=bfloat16,remat={remat}")
    cfg.model.attention_impl = attention
    st = STAGES[stage]
    cfg.train.update(trainable=st["trainable"], batch_size=st["batch_size"], mesh=tuple(mesh))
    cfg.data.max_len = st["max_len"]
    return cfg


def key(r: dict) -> tuple:
    # rows from before the TPU default became the Pallas kernel were compiled with XLA attention
    return (r["model"], r["stage"], r["topology"], r["schedule"], r["remat"], tuple(r["mesh_arg"]),
            bool(r.get("max_batch")), r.get("attention_impl", "xla"))


def done_rows(path: str) -> list:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def probes_of(out: str, k: tuple):
    """A `--max-batch` search compiles several batches (each minutes at 7B): each probe goes to
    `<out>_probes.jsonl` as it ends, so a search killed half-way resumes where it stopped, and
    the row already compiled at the stage's own batch counts as a probe.
    -> (the probes of row `k` compiled before, the callback that appends a new one)."""
    path = out[:-len(".jsonl")] + "_probes.jsonl" if out.endswith(".jsonl") else out + ".probes"
    tag = json.loads(json.dumps(k))
    plain = k[:6] + (False,) + k[7:]  # the same row without --max-batch (`key`'s 7th field)
    known = {r["batch_per_device"]: aot.probe_record(r) for r in done_rows(out) if key(r) == plain}
    # each verdict taken again from its report (`aot.fits_hbm`: the rule may have changed since)
    known.update((p["batch"], aot.probe_record(p["report"])) for p in done_rows(path) if p.get("key") == tag)

    def on_probe(record):
        with open(path, "a") as f:
            f.write(json.dumps(dict(record, key=tag)) + "\n")
    return known, on_probe


def measure(rows, schedules, out: str, remat: str, mesh, find_max: bool, flops: str = "host",
            retry_oom: bool = True, attention=None):
    seen = {key(r) for r in done_rows(out)}
    impl = resolve(attention, "tpu")
    for row in rows:
        model, stage, topology = row.split(":", 2)
        for name in schedules:
            k = (model, stage, topology, name, remat, tuple(mesh), find_max, impl)
            if k in seen:
                continue
            cfg = config(model, stage, name, remat, mesh, attention)
            t0 = time.time()
            known, on_probe = probes_of(out, k) if find_max else (None, None)
            r = aot.run(cfg, topology, "train", find_max=find_max, flops=flops,
                        log=lambda s: print(s, flush=True), retry_oom=retry_oom,
                        known_probes=known, on_probe=on_probe)
            r.update(model=model, stage=stage, mesh_arg=list(mesh), max_batch=find_max,
                     wall_s=round(time.time() - t0, 1))
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[{model} {stage}] {aot.summary(r)} (wall {r['wall_s']} s)", flush=True)


def fill_flops(path: str):
    """Count the FLOPs ("host": seconds each) of the rows compiled without them, and rewrite
    `path` with their roofline fields: a row's memory figures stay as compiled."""
    rows = done_rows(path)
    for r in rows:
        if r.get("flops_per_device") is not None or r["bytes_per_device"] is None:
            continue
        cfg = config(r["model"], r["stage"], r["schedule"], r["remat"], r["mesh_arg"], r.get("attention_impl"))
        chip, devices = aot.topology_devices(r["topology"])
        mesh = aot.topology_mesh(cfg, devices)
        cfg = aot.with_batch(cfg, r["batch_per_device"], aot.data_parallel(mesh))
        r.update(aot.flops_fields(cfg, mesh, "train", 32, "host", aot.device_spec(chip, devices)))
        print(f"[{r['model']} {r['stage']} {r['topology']} {r['schedule']}] {r['flops_per_device'] / 1e12:.1f} "
              f"TFLOP/device, est. step {r['est_step_s']:.3f} s", flush=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)  # never a half-written results file


def table(path: str) -> str:
    """Every row of `path`, grouped by model, stage (2 first), slice and kernel, schedules in SCHEDULES
    order. Step and FLOPs ratios are per row (sample) against vanilla on the same slice and kernel:
    at the same rows per chip, or, for a largest-batch row, at vanilla's largest batch (what a
    user running each at its fullest gets: the throughput ratio, where the step ratio alone would
    compare different batches)."""
    rows = done_rows(path)
    g = lambda b: f"{b / 2 ** 30:.1f}"  # noqa: E731
    same = lambda r: (r["model"], r["stage"], r["topology"], r["remat"], tuple(r["mesh_arg"]),  # noqa: E731
                      "largest" if r.get("max_batch") else r["batch_per_device"],
                      r.get("attention_impl", "xla"))
    per_row = lambda r, k: r[k] / r["batch_per_device"]  # noqa: E731
    order = {s: i for i, s in enumerate(SCHEDULES)}
    rows.sort(key=lambda r: (list(MODELS).index(r["model"]), -int(r["stage"][1:]), r["topology"],
                             r.get("attention_impl", "xla"), r["batch_per_device"],
                             order.get(r["schedule"], len(order))))
    lines = ["| model | stage | slice | mesh | remat | attention | schedule | batch/chip | temp GiB "
             "| GiB/chip (arg+out+temp−alias) | HBM GiB | fits | largest batch/chip | est. step (s) "
             "| step per row vs vanilla | analytic FLOPs per row vs vanilla | est. MFU | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {same(r): r for r in rows if r["schedule"] == "vanilla" and r.get("est_step_s")}
    for r in rows:
        b = base.get(same(r))
        step = r.get("est_step_s")
        ratio = f"{per_row(r, 'est_step_s') / per_row(b, 'est_step_s'):.3f}" if b and step else "—"
        fr = (f"{per_row(r, 'model_flops_per_device') / per_row(b, 'model_flops_per_device'):.3f}"
              if b and r.get("model_flops_per_device") else "—")
        mesh = "×".join(str(v) for v in r["mesh"].values())
        mfu = "—" if r.get("est_mfu") is None else f"{r['est_mfu']:.2f}"
        m = r["bytes_per_device"]
        if m is not None:
            temp, total = g(m["temp"]), g(m["total"])
        else:  # not compiled again: the compiler's "required" figure from its message
            req = (r.get("oom") or {}).get("required_bytes")
            temp, total = (g(req) if req else "—"), "> HBM"
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['topology']} | {mesh} | {r['remat']} "
            f"| {r.get('attention_impl', 'xla')} | {r['schedule']} "
            f"| {r['batch_per_device']} | {temp} | {total} | {g(r['hbm_bytes_per_device'])} "
            f"| {'yes' if aot.fits_hbm(r) else 'no'} | {r.get('max_batch_per_device', '—')} "
            f"| {'—' if step is None else f'{step:.3f}'} | {ratio} | {fr} "
            f"| {mfu} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="MODEL:STAGE:TOPOLOGY, comma-separated")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--remat", default="full")
    ap.add_argument("--attention", default=None, choices=("xla", "pallas"),
                    help="model.attention_impl (default: the TPU default, the Pallas flash kernel)")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
    ap.add_argument("--max-batch", action="store_true", help="also search the largest batch per chip")
    ap.add_argument("--flops", default="host", choices=aot.FLOPS,
                    help="how to count FLOPs for the roofline (hidrop_jax.aot): host (seconds), tpu "
                         "(a second, unrolled compile: also bytes; up to an hour at 7B), none")
    ap.add_argument("--fill-flops", action="store_true",
                    help="count the host FLOPs of the rows of --out that lack them, then print the table")
    ap.add_argument("--no-retry", action="store_true",
                    help="a program over HBM: keep the compiler's message, do not compile it again "
                         "with xla_tpu_no_crash_on_oom (that second compile is slow at 7B)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    a = ap.parse_args(argv)
    if a.fill_flops:
        fill_flops(a.out)
    elif not a.table:
        measure(a.rows.split(","), a.schedules.split(","), a.out, a.remat,
                tuple(int(x) for x in a.mesh.split(",")), a.max_batch, a.flops, not a.no_retry,
                a.attention)
    print(table(a.out))


if __name__ == "__main__":
    main()
