"""Choose HiDrop's layers for a model from data: similarity curves, ILVAS, exit probe, proposal.

    python -m hidrop_jax.analyze (--workdir DIR | --hf HF_DIR) --data NAME[:split] --samples N \\
        --out OUT_DIR [--budget 64] [--tolerance 0.02] [--topk K] [--ilvas-n 4,8]

Streams `--samples` examples of the split (default `validation`) in batches through one jitted
function (memory does not grow with N: only sums and counts are kept) and writes to OUT_DIR:

  report.json           every curve, the settings, and the proposal with the rules used
  intra_modal.png       cos(input, output) of each layer for system / vision / text tokens
  cross_modal.png       instruction states with the sample's image vs another sample's
  ilvas.png             ILVAS(l, l + n, K) for each n, chosen maxima marked
  exit_probe.png        loss / accuracy when vision tokens leave from layer e on (no training)
  schedule.png          proposed vision tokens per layer
  stages/               for a few sample images, which patches survive each cut (dropped ones
                        dimmed, kept ones framed), under the proposed schedule
  schedule_flags.txt    `--config.hidrop...` overrides for hidrop_jax.train / evaluate
  preset.py             the same as a Python dict (a preset-like snippet)

Definitions and proposal rules: `hidrop_jax.hidrop.analysis` (module doc). Layers are 0-based.

Data: NAME as in `hidrop_jax.data.sources` (e.g. `shapes_vqa`,
`shapes_vqa:train=64,validation=16,test=16`), `:split` at the end (a last part without '=').
Tokenizer: a workdir's own (as in training); for `--hf`, `--tokenizer DIR` or the HF directory's
tokenizer files (tokenizer.json); without one the tool stops: token ids from another vocabulary
would be meaningless to the model. ILVAS runs on the vanilla model unless `--ilvas-model` says
`run` (the workdir's inject/exit: the model it was trained as), `proposed` (a second pass on the
proposed inject/exit, as in the paper) or `INJECT:EXIT`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hidrop_jax.analysis import plots, probes
from hidrop_jax.batch import first_query_row, to_inputs
from hidrop_jax.hidrop import propose as proposal
from hidrop_jax.data.sources import load_source
from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.data.tokenizer import load_tokenizer, shapes_vqa_tokenizer
from hidrop_jax.checkpoint import load_run
from hidrop_jax.hf.load import load_hf
from hidrop_jax.config import n_vision_tokens
from hidrop_jax.model import forward

DEFAULT_SPLIT = "validation"


# ----------------------------------------------------------------------------- inputs

def parse_data(spec: str):
    """'NAME[:args][:split]' -> (dataset spec, split)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail and "=" not in tail:
        return head, tail
    return spec, DEFAULT_SPLIT


def open_source(spec: str, data_dir: str, manual_dir=None):
    name, split = parse_data(spec)
    try:
        return load_source(name, split, data_dir, manual_dir=manual_dir), name, split
    except ValueError as e:
        msg = str(e)
        if "split" in msg.lower():
            raise ValueError(f"--data {spec!r}: split {split!r} unknown for dataset {name!r} "
                             f"({msg})") from None
        raise ValueError(f"--data {spec!r}: {msg}") from None


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists()


def load_model(a):
    """(cfg, params, tokenizer, spec, data_dir, source description) for --workdir / --hf."""
    if a.workdir:
        cfg, params, step = load_run(a.workdir)
        wd = Path(a.workdir).absolute()
        d = cfg.data
        if a.tokenizer:
            tok = load_tokenizer(a.tokenizer)
        elif d.tokenizer:
            tok = load_tokenizer(d.tokenizer)
        elif (wd / "tokenizer").exists():
            tok = load_tokenizer(str(wd / "tokenizer"))
        elif d.name.startswith("shapes_vqa"):
            tok = shapes_vqa_tokenizer()
        else:
            raise ValueError(f"{wd} has no tokenizer/ and data.tokenizer is empty: pass --tokenizer")
        data_dir = a.data_dir or d.data_dir or str(wd / "data")
        template, max_len, nq = d.template, d.max_len, d.num_queries
        origin = dict(workdir=str(wd), step=int(step))
    else:
        hf = Path(a.hf)
        cfg, params = load_hf(hf)
        tok_dir = Path(a.tokenizer) if a.tokenizer else hf
        if not _has_tokenizer(tok_dir):
            raise ValueError(
                f"no tokenizer in {str(tok_dir)!r} (tokenizer.json): the data must be tokenized "
                f"with the model's own vocabulary ({cfg.model.text.vocab_size} ids); save it "
                "there or pass --tokenizer DIR")
        tok = load_tokenizer(str(tok_dir))
        data_dir = a.data_dir or str(Path(a.out) / "data")
        template, max_len, nq = "v1", 128, 4
        origin = dict(hf=str(hf.absolute()))
    if len(tok) > cfg.model.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocabulary has "
                         f"{cfg.model.text.vocab_size}: not this model's tokenizer")
    spec = data_lib.TextImageSpec.for_model(
        cfg.model, template=a.template or template, max_len=a.max_len or max_len, num_queries=nq)
    return cfg, params, tok, spec, data_dir, origin


def parse_ns(text: str):
    try:
        ns = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--ilvas-n {text!r}: expected comma-separated ints, e.g. 4,8") from None
    if not ns:
        raise ValueError(f"--ilvas-n {text!r}: give at least one n")
    return ns


def check_settings(a, L: int, N: int, ns):
    """Fails before any data is read, naming the bad value."""
    if not 0 < a.budget <= N:
        raise ValueError(f"--budget {a.budget:g} must be in (0, {N}]: it is a mean number of vision "
                         f"tokens per layer and this model has {N} vision tokens per image")
    if a.tolerance < 0:
        raise ValueError(f"--tolerance {a.tolerance!r} must be ≥ 0 (relative loss increase)")
    if a.samples < 1:
        raise ValueError(f"--samples {a.samples} must be ≥ 1")
    if a.batch_size < 2:
        raise ValueError(f"--batch-size {a.batch_size} must be ≥ 2 (the cross-modal similarity "
                         "pairs each sample with another sample's image)")
    if a.topk is not None and not 1 <= a.topk <= N:
        raise ValueError(f"--topk {a.topk} must be in [1, {N}] (the vision tokens)")
    for n in ns:
        if not 1 <= n <= L - 1:
            raise ValueError(f"--ilvas-n {n}: ILVAS(l, l+{n}) needs a model with more than {n} "
                             f"layers (n in [1, {L - 1}]); this model has {L}")


def ilvas_window(a, cfg, L):
    """(inject, exit) of the model ILVAS runs on, or None (vanilla / decided after pass 1)."""
    mode = a.ilvas_model
    if mode in ("vanilla", "proposed"):
        return None
    if mode == "run":
        h = cfg.hidrop
        ex = L if h.exit_layer is None else int(h.exit_layer)
        return (int(h.inject_layer), ex)
    try:
        inj, ex = (int(v) for v in mode.split(":"))
    except ValueError:
        raise ValueError(f"--ilvas-model {mode!r}: one of vanilla, run, proposed, INJECT:EXIT") from None
    if not 0 <= inj < ex <= L:
        raise ValueError(f"--ilvas-model {mode!r}: need 0 ≤ inject < exit ≤ {L}")
    return (inj, ex)


def check_window(window, ns, L):
    inj, ex = window
    for n in ns:
        if ex - 1 - n < inj:
            raise ValueError(f"--ilvas-n {n}: with vision tokens only in layers [{inj}, {ex}) no "
                             f"layer pair (l, l+{n}) has them both; use a smaller n")


# ----------------------------------------------------------------------------- streaming

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


def _list(x):
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, np.float64)]


# ----------------------------------------------------------------------------- outputs

def _mark(ax, prop, *, what=("inject", "cuts", "exit")):
    if prop is None:
        return
    if "inject" in what:
        ax.axvline(prop["inject_layer"], color="tab:green", lw=1.5,
                   label=f"inject_layer={prop['inject_layer']}")
    if "cuts" in what:
        for i, p in enumerate(prop["prune_after"]):
            ax.axvline(p, color="tab:orange", ls=":", lw=1.2,
                       label="prune_after" if i == 0 else None)
    if "exit" in what:
        ax.axvline(prop["exit_layer"], color="tab:red", ls="--", lw=1.2,
                   label=f"exit_layer={prop['exit_layer']}")


def plot_all(report: dict, out: Path, size=(8, 4.5), dpi=100):
    """The curve PNGs (size·dpi pixels each); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    prop = report.get("proposal") if "inject_layer" in report.get("proposal", {}) else None
    L = report["model"]["num_layers"]
    layers = np.arange(L)
    files = []

    def save(fig, name):
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        files.append(str(path))

    f = lambda v: np.asarray([np.nan if x is None else x for x in v], float)
    fig, (ax, axv) = plt.subplots(1, 2, figsize=size, gridspec_kw=dict(width_ratios=(3, 2)))
    for k in probes.MODALITIES:
        ax.plot(layers, f(report["intra_modal"][k]), marker="o", ms=3, label=k)
    _mark(ax, prop)
    ax.set(xlabel="layer l (0-based)", ylabel="mean cos(h_l, h_{l+1})",
           title="intra-modal similarity (vanilla model)")
    ax.legend(fontsize=8)
    c = f(report["intra_modal"]["vision"])
    axv.plot(layers, c, marker="o", ms=3, color="tab:orange")  # own y-range: the dips show
    if prop:
        axv.plot([prop["inject_layer"]], [c[prop["inject_layer"]]], "v", color="tab:green", ms=10,
                 label="chosen dip")
        axv.legend(fontsize=8)
    _mark(axv, prop, what=("inject",))
    axv.set(xlabel="layer l (0-based)", title="vision (zoom): inject at the dip")
    save(fig, "intra_modal.png")

    fig, ax = plt.subplots(figsize=size)
    ax.plot(layers, f(report["cross_modal"]), marker="o", ms=3, color="tab:purple")
    _mark(ax, prop, what=("inject",))
    ax.set(xlabel="layer l (0-based)", ylabel="cos(own image, other image)",
           title="cross-modal: instruction states after layer l (≈1: no fusion yet)")
    if prop:  # only the marks carry labels
        ax.legend(fontsize=8)
    save(fig, "cross_modal.png")

    fig, ax = plt.subplots(figsize=size)
    for n, c in report["ilvas"]["curves"].items():
        ax.plot(layers, f(c), marker="o", ms=3, label=f"ILVAS(l, l+{n}, K={report['ilvas']['topk']})")
    if prop:
        comb = f(report["proposal"]["details"]["pruning"]["combined"])
        sel = [p + 1 for p in prop["prune_after"]]
        ax.plot(sel, comb[sel], "*", color="tab:orange", ms=14, label="chosen maxima (cut after l−1)")
    _mark(ax, prop)
    ax.set(xlabel="layer l (0-based)", ylabel="ILVAS",
           title=f"ILVAS on the {report['ilvas']['model']} model")
    ax.legend(fontsize=8)
    save(fig, "ilvas.png")

    fig, ax = plt.subplots(figsize=size)
    ex = np.arange(1, L + 1)
    probe = report["exit_probe"]
    loss = f(probe["loss"])
    ax.plot(ex, loss, marker="o", ms=3, color="tab:blue", label="loss (vision dropped from e on)")
    if np.isfinite(loss[-1]):
        tol = report["settings"]["tolerance"]
        ax.axhspan(loss[-1], loss[-1] * (1 + tol), color="tab:blue", alpha=0.12,
                   label=f"baseline +{tol:.0%}")
    _mark(ax, prop, what=("exit",))
    ax.set(xlabel="exit layer e (vision tokens dropped from layer e on; e = L: vanilla)",
           ylabel="loss per answer token", title="early-exit probe (no training)")
    if probe.get("answer_accuracy") is not None:
        ax2 = ax.twinx()
        ax2.plot(ex, f(probe["answer_accuracy"]), marker="s", ms=3, color="tab:gray", ls="--",
                 label="answer accuracy")
        ax2.set_ylabel("answer accuracy")
        ax2.legend(fontsize=8, loc="lower right")
    ax.legend(fontsize=8, loc="upper right")
    save(fig, "exit_probe.png")

    if prop:
        fig, ax = plt.subplots(figsize=size)
        ax.bar(layers, prop["tokens_per_layer"], color="tab:cyan")
        ax.set_yscale("symlog", linthresh=1)
        ax.set(xlabel="layer (0-based)", ylabel="vision tokens",
               title=f"proposed schedule: mean {prop['mean_tokens']:.2f} tokens/layer "
                     f"(budget {report['settings']['budget']:g})")
        save(fig, "schedule.png")
    return files


def unnormalize(pixels, mean, std):
    """CLIP-normalised float [H, W, 3] -> uint8."""
    x = np.asarray(pixels, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def draw_stages(cfg, params, schedule, inputs, spec, out: Path, n_show: int):
    """PNG per sample and cut (+ the input, + a strip of all) under `schedule`: which patches
    survive. Returns the paths."""
    from PIL import Image
    if n_show < 1 or not schedule.prune_after:
        return []
    c = copy.deepcopy(cfg)
    c.hidrop.update(inject_layer=schedule.inject_layer, prune_after=tuple(schedule.prune_after),
                    keep=tuple(schedule.keep), exit_layer=schedule.exit)
    q = first_query_row(inputs)
    ins = inputs._replace(query_idx=q[:, None], query_valid=jnp.ones((len(q), 1), bool))
    kept = jax.jit(lambda p, x: forward(c, p, x, return_aux=True)[1]["kept"])(params, ins)
    kept = [np.asarray(k) for k in jax.device_get(kept)]
    m = cfg.model
    grid = m.vision.image_size // m.vision.patch_size
    cls = n_vision_tokens(m) != grid * grid
    scale = plots.display_scale(m.vision.image_size)
    d = out / "stages"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for b in np.flatnonzero(np.asarray(inputs.has_image))[:n_show]:
        img = unnormalize(np.asarray(inputs.pixels[b]), spec.image_mean, spec.image_std)
        panels = [np.repeat(np.repeat(img, scale, 0), scale, 1)]
        path = d / f"sample{b}_input.png"
        Image.fromarray(panels[0]).save(path)
        files.append(str(path))
        for i, (p, k) in enumerate(zip(schedule.prune_after, schedule.keep)):
            pic = plots.patch_overlay(img, kept[i][b], grid, cls_token=cls, scale=scale)
            path = d / f"sample{b}_cut{i + 1}_after_layer{p}_keep{k}.png"
            Image.fromarray(pic).save(path)
            files.append(str(path))
            panels.append(pic)
        sep = np.full((panels[0].shape[0], 6, 3), 255, np.uint8)
        strip = np.concatenate([x for pnl in panels for x in (pnl, sep)][:-1], axis=1)
        path = d / f"sample{b}_all_stages.png"
        Image.fromarray(strip).save(path)
        files.append(str(path))
    return files


def preset_snippet(s, report) -> str:
    return (f"# Proposed by `python -m hidrop_jax.analyze` from {report['data']['samples']} samples "
            f"of {report['data']['name']}:{report['data']['split']}\n"
            f"# ({report['model']['num_layers']} layers, {report['model']['n_vision']} vision "
            f"tokens, budget {report['settings']['budget']:g}; 0-based layers).\n"
            f"#   cfg.hidrop.update(PROPOSED)\n"
            f"#   Schedule(num_layers={s.num_layers}, n_vision={s.n_vision}, **PROPOSED)\n"
            f"PROPOSED = dict(inject_layer={s.inject_layer}, prune_after={tuple(s.prune_after)}, "
            f"keep={tuple(s.keep)}, exit_layer={s.exit})\n")


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ----------------------------------------------------------------------------- main

def build_parser():
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run (config.json + checkpoints/)")
    src.add_argument("--hf", help="a Hugging Face LLaVA directory (with its tokenizer)")
    ap.add_argument("--data", required=True, help="NAME[:args][:split], split default validation")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=64.0,
                    help="mean vision tokens per layer of the proposal (paper: Tok64)")
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="exit: relative probe-loss increase allowed over the baseline")
    ap.add_argument("--topk", type=int, default=None, help="ILVAS K (default 10%% of tokens)")
    ap.add_argument("--ilvas-n", default="4,8", help="comma-separated layer gaps n")
    ap.add_argument("--ilvas-model", default="vanilla",
                    help="vanilla | run | proposed | INJECT:EXIT (the model ILVAS runs on)")
    ap.add_argument("--ilvas-mode", default="flat", choices=("flat", "token"))
    ap.add_argument("--max-cuts", type=int, default=4)
    ap.add_argument("--min-prominence", type=float, default=0.5,
                    help="injection: a dip counts if ≥ this fraction of the deepest one")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--show", type=int, default=4, help="sample images drawn per stage")
    ap.add_argument("--data-dir", default="", help="TFDS data dir (default: the run's, or OUT/data)")
    ap.add_argument("--manual-dir", default="")
    ap.add_argument("--tokenizer", default="", help="tokenizer directory (overrides the default)")
    ap.add_argument("--template", default="", help="chat template (default: the run's, or v1)")
    ap.add_argument("--max-len", type=int, default=0, help="text rows (default: the run's, or 128)")
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    cfg, params, tok, spec, data_dir, origin = load_model(a)
    L, N = cfg.model.text.num_layers, n_vision_tokens(cfg.model)
    ns = parse_ns(a.ilvas_n)
    check_settings(a, L, N, ns)
    topk = a.topk or max(1, round(0.1 * N))
    window = ilvas_window(a, cfg, L)
    if window is not None:
        check_window(window, ns, L)
    source, name, split = open_source(a.data, data_dir, a.manual_dir or None)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.device_put(params)

    same_pass = a.ilvas_model != "proposed"
    flags = None if window is None else jnp.asarray(probes.vision_flags(L, *window))
    sums, (correct, rounds), samples, with_img, first = stream(
        a, cfg, params, tok, spec, source, curves=True, ilvas=same_pass, ns=ns, topk=topk,
        vision_on=flags, desc="analyze")
    if with_img == 0:
        raise ValueError(f"--data {a.data!r}: none of the {samples} samples has an image")
    intra = sums.ratio("intra_sum", "intra_count")
    probe_loss = sums.ratio("probe_nll", "probe_tokens")
    report = dict(
        model=dict(origin, num_layers=L, n_vision=N, hidden_size=cfg.model.text.hidden_size),
        data=dict(name=name, split=split, samples=samples, samples_with_image=with_img,
                  batch_size=a.batch_size, max_len=spec.max_len, template=spec.template),
        settings=dict(budget=a.budget, tolerance=a.tolerance, topk=topk, ilvas_n=list(ns),
                      ilvas_mode=a.ilvas_mode, max_cuts=a.max_cuts,
                      min_prominence=a.min_prominence),
        intra_modal={k: _list(intra[:, i]) for i, k in enumerate(probes.MODALITIES)},
        cross_modal=_list(sums.ratio("cross_sum", "cross_count")),
        exit_probe=dict(
            exit_layer=list(range(1, L + 1)), loss=_list(probe_loss),
            token_accuracy=None, answer_accuracy=None, answer_rounds=rounds,
            baseline_loss=_list(probe_loss[-1:])[0]),
    )
    if rounds:
        report["exit_probe"]["answer_accuracy"] = _list(correct / rounds)
    if float(sums.d.get("probe_tokens", 0)):
        report["exit_probe"]["token_accuracy"] = _list(sums.ratio("probe_hit_sum", "probe_tokens"))

    vision_curve = report["intra_modal"]["vision"]
    if window is None and a.ilvas_model == "proposed":
        inj, _ = proposal.pick_injection(vision_curve, a.min_prominence)
        ex, _ = proposal.pick_exit(report["exit_probe"]["loss"], a.tolerance)
        window = (inj, max(ex, min(L, inj + 2)))
        check_window(window, ns, L)
        sums2, *_ = stream(a, cfg, params, tok, spec, source, curves=False, ilvas=True, ns=ns,
                           topk=topk, vision_on=jnp.asarray(probes.vision_flags(L, *window)),
                           desc="ILVAS")
        sums.d.update({k: v for k, v in sums2.d.items() if k.startswith("ilvas")})
    model_name = ("vanilla" if window is None else
                  f"inject {window[0]} / exit {window[1]} ({a.ilvas_model})")
    window = window or (0, L)
    curves = ilvas_curves(sums, ns, L, window)
    report["ilvas"] = dict(model=model_name, window=list(window), topk=topk, curves=curves)

    try:
        s, details = proposal.propose(vision_curve=vision_curve,
                                ilvas_curves={int(n): c for n, c in curves.items()},
                                probe_loss=report["exit_probe"]["loss"], num_layers=L, n_vision=N,
                                budget=a.budget, tolerance=a.tolerance, max_cuts=a.max_cuts,
                                min_prominence=a.min_prominence)
        report["proposal"] = dict(proposal.schedule_dict(s), details=details,
                                  config_flags=proposal.config_flags(s), rules=RULES)
    except ValueError as e:
        s = None
        report["proposal"] = dict(error=str(e), rules=RULES)
    files = plot_all(report, out)
    if s is not None:
        files += draw_stages(cfg, params, s, first[0], spec, out, a.show)
        (out / "schedule_flags.txt").write_text(proposal.config_flags(s) + "\n")
        (out / "preset.py").write_text(preset_snippet(s, report))
    report["files"] = [str(Path(f).relative_to(out)) for f in files]
    report["runtime_s"] = round(time.time() - t0, 2)
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=1))
    print(summary(report))
    if s is None:
        raise ValueError(report["proposal"]["error"])
    return report


RULES = dict(
    inject_layer="earliest interior local minimum of the vision intra-modal curve whose dip depth "
                 "(prominence) is ≥ min_prominence × the deepest; none: 0",
    exit_layer="earliest e whose probe loss stays ≤ (1 + tolerance) × baseline for all e' ≥ e "
               "(L = no early exit); at least inject + 2",
    prune_after="ILVAS (mean over n) local maxima l in [inject+1, exit−1], the max_cuts highest; "
                "cut after l − 1 (the cut after p scores with layer p + 1's attention)",
    keep="geometric k_i = k_1·r^(i−1) ending at 1 (tail end raised only if needed for a concave "
         "profile or the budget), k_1 by bisection: mean tokens/layer within 1 of the budget",
)


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


if __name__ == "__main__":
    import sys
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
