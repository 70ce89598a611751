"""The analysis report: statistics streamed over a data source (`Sums`, `stream`), the curves
made from them, and what is written (report.json, preset snippet, the printed summary)."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

from hidrop_jax.analysis import probes
from hidrop_jax.batch import to_inputs
from hidrop_jax.data import pipeline as data_lib


class Sums:
    """Host-side float64 accumulators of the jitted batch statistics."""

    def __init__(self):
        self.d = {}

    def add(self, out: dict):
        for k, v in jax.device_get(out).items():
            if k == "probe_hits":
                continue
            if isinstance(v, dict):
                for n, x in v.items():
                    key = f"{k}/{n}"
                    self.d[key] = self.d.get(key, 0) + np.asarray(x, np.float64)
            else:
                self.d[k] = self.d.get(k, 0) + np.asarray(v, np.float64)

    def ratio(self, num, den):
        with np.errstate(all="ignore"):
            return np.asarray(self.d[num]) / np.asarray(self.d[den])


def stream(a, cfg, params, tok, spec, source, *, curves, ilvas, ns, topk, vision_on, desc):
    """One pass over the first `--samples` examples: (Sums, probe accuracy counts, samples,
    samples with an image, first batch)."""
    from tqdm import tqdm
    fn = jax.jit(functools.partial(probes.batch_statistics, cfg, ns=ns, topk=topk,
                                   ilvas_mode=a.ilvas_mode, curves=curves, ilvas=ilvas))
    n_total = min(a.samples, len(source))
    n_batches = math.ceil(n_total / a.batch_size)
    sums, seen, with_img = Sums(), 0, 0
    correct, rounds, first = None, 0, None
    bar = tqdm(total=n_batches, desc=desc, unit="batch")
    for batch in data_lib.eval_batches(source, tok, spec, batch_size=a.batch_size,
                                       shard_index=0, shard_count=1):
        inputs, targets = to_inputs(batch)
        idx = seen + np.arange(len(batch["example_valid"]))
        weight = (np.asarray(batch["example_valid"]) & (idx < n_total)).astype(np.float32)
        seen += len(idx)
        with_img += int((weight * np.asarray(inputs.has_image)).sum())
        if first is None:
            first = (inputs, targets)
        out = fn(params, inputs, targets.labels, targets.loss_mask, weight,
                 ilvas_vision_on=vision_on)
        sums.add(out)
        if curves:
            w_img = weight * np.asarray(inputs.has_image)
            c, r = probes.round_accuracy(jax.device_get(out["probe_hits"]), targets.loss_mask,
                                     targets.label_round, w_img)
            correct = c if correct is None else correct + c
            rounds += r
        bar.update(1)
        if seen >= n_total:
            break
    bar.close()
    return sums, (correct, rounds), int(min(seen, n_total)), with_img, first


def ilvas_curves(sums, ns, L, window):
    """{n: [L] list with None where undefined} from the summed ILVAS."""
    inj, ex = window
    out = {}
    for n in ns:
        v = sums.ratio(f"ilvas_sum/{n}", "ilvas_count")
        full = [None] * L
        for l in range(L - n):
            if inj <= l and l + n < ex and np.isfinite(v[l]):
                full[l] = float(v[l])
        out[str(n)] = full
    return out


def as_list(x):
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, np.float64)]


def preset_snippet(s, report) -> str:
    return (f"# Proposed by `python -m hidrop_jax.analyze` from {report['data']['samples']} samples "
            f"of {report['data']['name']}:{report['data']['split']}\n"
            f"# ({report['model']['num_layers']} layers, {report['model']['n_vision']} vision "
            f"tokens, budget {report['settings']['budget']:g}; 0-based layers).\n"
            f"#   cfg.hidrop.update(PROPOSED)\n"
            f"#   Schedule(num_layers={s.num_layers}, n_vision={s.n_vision}, **PROPOSED)\n"
            f"PROPOSED = dict(inject_layer={s.inject_layer}, prune_after={tuple(s.prune_after)}, "
            f"keep={tuple(s.keep)}, exit_layer={s.exit})\n")


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def summary(report: dict) -> str:
    p = report["proposal"]
    lines = [f"analysed {report['data']['samples']} samples ({report['data']['samples_with_image']} "
             f"with an image) of {report['data']['name']}:{report['data']['split']} in "
             f"{report.get('runtime_s', 0):.1f} s; model: {report['model']['num_layers']} layers, "
             f"{report['model']['n_vision']} vision tokens"]
    if "error" in p:
        lines.append(f"no proposal: {p['error']}")
        return "\n".join(lines)
    lines += [
        f"proposed schedule (0-based): inject_layer={p['inject_layer']} "
        f"prune_after={tuple(p['prune_after'])} keep={tuple(p['keep'])} exit_layer={p['exit_layer']}",
        f"  vision tokens per layer {p['tokens_per_layer']} mean {p['mean_tokens']:.2f} "
        f"(budget {report['settings']['budget']:g})",
        f"  train/evaluate with: --config CONFIG:schedule=tok64 {p['config_flags']}",
    ]
    for note in p["details"]["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
