"""Temporaries of the Pallas flash attention vs the masked XLA attention, compiled for TPU.

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python benchmarks/fused_attention.py \
        [--topology v5e:2x2 --max-len 3000 --program train]

The small model of tests/aot_config.py (4 layers, d=512, 4 heads of 128) at a LLaVA-NeXT-like
length (default 3,000 text rows + 16 vision tokens), compiled by libtpu with
`model.attention_impl` = xla and = pallas (`hidrop_jax.aot`); the compiled temporaries per
device are compared, and the kernel's custom call is looked for in the compiled HLO.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hidrop_jax import aot  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--max-len", type=int, default=3000)
    ap.add_argument("--program", default="prefill", choices=aot.PROGRAMS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fused_attention.json"))
    a = ap.parse_args(argv)
    import aot_config
    chip, devices = aot.topology_devices(a.topology)
    rows = {}
    for impl in ("xla", "pallas"):
        cfg = aot_config.get_config("schedule=tok64")
        cfg.model.attention_impl = impl
        cfg.train.update(batch_size=a.batch, mesh=(-1, 1, 1))
        cfg.data.max_len = a.max_len
        compiled, fits, secs = aot.compile_program(*aot.program(cfg, aot.topology_mesh(cfg, devices), a.program, 4))
        rows[impl] = dict(memory=aot.memory(compiled), fits=fits, compile_s=round(secs, 1),
                          kernel_in_hlo="tpu_custom_call" in compiled.as_text())
        m = rows[impl]["memory"]
        print(f"{impl:7s} temp {m['temp'] / 2**20:9.1f} MiB, total {m['total'] / 2**20:9.1f} MiB, fits {fits}, "
              f"kernel in HLO {rows[impl]['kernel_in_hlo']}, compile {secs:.1f} s", flush=True)
    out = dict(topology=a.topology, program=a.program, max_len=a.max_len, batch=a.batch, rows=rows,
               temp_ratio=rows["pallas"]["memory"]["temp"] / rows["xla"]["memory"]["temp"])
    print(f"pallas / xla temporaries: {out['temp_ratio']:.3f}")
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
