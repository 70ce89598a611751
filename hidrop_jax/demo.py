"""`make demo`: the CPU demo, end to end.

1. build the bundled `shapes_vqa` dataset (TFDS, ArrayRecord, generated offline from a seed);
2. train the tiny LLaVA (`configs/tiny_shapes.py`, 144 vision tokens) with HiDrop: LLaVA's stage
   2, from the CLIP tower pretrained on the dataset (`assets/tiny_shapes_clip`, kept frozen);
3. evaluate on the validation split under HiDrop and under `vanilla` (all tokens everywhere);
4. export to Hugging Face format and evaluate the export with PyTorch, vanilla (plain HF LLaVA)
   and under the trained schedule (the export's HiDrop modeling code, `trust_remote_code`).

    python -m hidrop_jax.demo [--workdir runs/demo] [--steps 1500] [--schedule tok64] [--from-scratch]

Rerunning resumes: the dataset, the checkpoints and the export are reused when present.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import absl.logging
import jax

from hidrop_jax import evaluate as eval_lib
from hidrop_jax import sharding as shard_lib
from hidrop_jax import train as train_lib
from hidrop_jax.checkpoint import load_run
from hidrop_jax.config import load_config, schedule_of, with_schedule
from hidrop_jax.data.setup import open_data
from hidrop_jax.data.sources import data_dir_for
from hidrop_jax.hf.save import save_hf
from hidrop_jax.hf.torch_eval import evaluate_torch
from hidrop_jax.hidrop.schedule import vision_flops

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_shapes.py"  # make demo runs in a checkout


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=None, help="training steps (config default 1500)")
    ap.add_argument("--schedule", default="tok64", help="HiDrop preset to train with")
    ap.add_argument("--data", default="shapes_vqa", help="dataset spec (small: shapes_vqa/small)")
    ap.add_argument("--from-scratch", action="store_true",
                    help="no pretrained tower: train vision tower, projector and LLM together")
    ap.add_argument("--eval-batches", type=int, default=0, help="0 = the whole validation split")
    a = ap.parse_args(argv)
    absl.logging.set_verbosity(absl.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)

    work = Path(a.workdir).absolute()
    cfg = load_config(f"{CONFIG}:schedule={a.schedule}")
    cfg.data.name = a.data
    if a.steps:
        cfg.train.steps = a.steps
    if a.from_scratch:
        cfg.train.update(init_vision="", trainable="all")
    report = {"workdir": str(work), "schedule": cfg.hidrop.to_dict(), "train_config": cfg.train.to_dict()}
    t0 = time.time()
    where = data_dir_for(cfg.data.name, cfg.data.data_dir, work / "data")
    print(f"[1/4] dataset {cfg.data.name} -> {where} (built once per machine, ~2 min for 22k examples)")
    tok, spec, _, eval_src = open_data(cfg, work)
    report["data_seconds"] = round(time.time() - t0, 1)

    print(f"[2/4] training {cfg.train.steps} steps, batch {cfg.train.batch_size}, schedule "
          f"{a.schedule} (progress bar; metrics in {work / 'metrics.jsonl'})")
    t1 = time.time()
    last = train_lib.train(cfg, work)
    report["train_seconds"] = round(time.time() - t1, 1)
    report["train_last"] = last

    print("[3/4] evaluating on the validation split")
    cfg, params, step = load_run(work)
    mesh = shard_lib.make_mesh(tuple(cfg.train.mesh))
    nb = a.eval_batches or None
    results, flops = {}, {}
    t = cfg.model.text
    for name in dict.fromkeys((a.schedule, "vanilla")):  # once each, also when training vanilla
        c = with_schedule(cfg.copy_and_resolve_references(), name)
        results[name] = eval_lib.evaluate_params(c, params, eval_src, tok, spec, mesh, max_batches=nb)
        flops[name] = vision_flops(schedule_of(c), t.hidden_size, t.intermediate_size)
    report["step"] = int(step)
    report["eval"] = results
    report["vision_flops_ratio"] = flops[a.schedule] / flops["vanilla"]

    print("[4/4] exporting to Hugging Face format and evaluating it with PyTorch")
    hf_dir = work / "hf"
    save_hf(cfg, jax.device_get(params), hf_dir, tokenizer=tok, overwrite=True)
    bs = cfg.train.batch_size  # the same batches as the JAX evaluation, answer for answer
    report["torch_vanilla"] = evaluate_torch(hf_dir, eval_src, tok, spec, batch_size=bs, max_batches=nb)
    report["torch_hidrop"] = evaluate_torch(hf_dir, eval_src, tok, spec, batch_size=bs, max_batches=nb,
                                            hidrop=True)
    report["total_seconds"] = round(time.time() - t0, 1)
    (work / "demo_report.json").write_text(json.dumps(report, indent=1))

    print(f"\nValidation accuracy after {step} steps (teacher-forced answers, {results['vanilla']['rounds']} rounds):")
    types = sorted(results["vanilla"]["per_type"])
    print(f"{'':24s} {'overall':>8s} " + " ".join(f"{t:>9s}" for t in types) + "  vision tok/layer")
    rows = [(f"JAX {n}", results[n]) for n in results] + [
        ("PyTorch export, vanilla", report["torch_vanilla"]),
        (f"PyTorch export, {a.schedule}", report["torch_hidrop"])]
    for label, r in rows:
        mean = r.get("mean_vision_tokens", results[a.schedule if label.endswith(a.schedule) else
                                                    "vanilla"]["mean_vision_tokens"])
        print(f"{label:24s} {r['accuracy']:8.3f} "
              + " ".join(f"{r['per_type'].get(t, {}).get('accuracy', float('nan')):9.3f}" for t in types)
              + f"  {mean:6.1f}")
    print(f"\nvision-token FLOPs in the decoder (paper formula, Σ_l F(n_l)): {a.schedule} = "
          f"{100 * report['vision_flops_ratio']:.1f}% of vanilla")
    print(f"train {report['train_seconds']:.0f} s ({last.get('text_tokens_per_s', 0):.0f} text tokens/s "
          f"at the end), total {report['total_seconds']:.0f} s; "
          f"report: {work / 'demo_report.json'}; HF export: {hf_dir}")
    return report


if __name__ == "__main__":
    main()
