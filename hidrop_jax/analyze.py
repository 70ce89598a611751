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
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from hidrop_jax import cli
from hidrop_jax.analysis import plots, probes
from hidrop_jax.analysis import report as reporting
from hidrop_jax.hidrop import propose as proposal
from hidrop_jax.data.sources import data_dir_for, load_source
from hidrop_jax.data import pipeline as data_lib
from hidrop_jax.data.tokenizer import load_tokenizer, shapes_vqa_tokenizer
from hidrop_jax.checkpoint import find_tokenizer, open_run
from hidrop_jax.config import n_vision_tokens, schedule_of
from hidrop_jax.families import family

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


def load_model(a):
    """(cfg, params, tokenizer, spec, data_dir, source description) for --workdir / --hf."""
    path = Path(a.workdir or a.hf).absolute()
    run = open_run(path)
    cfg, params = run.cfg, run.params
    tok_dir = find_tokenizer(path, cfg, explicit=a.tokenizer)
    d = cfg.get("data") or {}
    if tok_dir is not None:
        tok = load_tokenizer(str(tok_dir))
    elif d.get("name", "").startswith("shapes_vqa"):
        tok = shapes_vqa_tokenizer(family=family(cfg.model).name)
    else:
        raise ValueError(
            f"no tokenizer in {path} (tokenizer.json): the data must be tokenized with the "
            f"model's own vocabulary ({cfg.model.text.vocab_size} ids); save it there or pass "
            "--tokenizer DIR")
    if run.kind == "workdir":
        data_dir = data_dir_for(parse_data(a.data)[0], a.data_dir or d.data_dir, path / "data")
        template, max_len, nq = d.template, d.max_len, d.num_queries
        origin = dict(workdir=str(path), step=int(run.step))
    else:
        data_dir = data_dir_for(parse_data(a.data)[0], a.data_dir, Path(a.out) / "data")
        default = family(cfg.model).default_template
        template, max_len, nq = d.get("template", default), 128, 4
        origin = dict(hf=str(path)) if run.kind == "hf" else dict(checkpoint=str(path))
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
        s = schedule_of(cfg)
        return (s.inject_layer, s.exit)
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
    sums, (correct, rounds), samples, with_img, first = reporting.stream(
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
        intra_modal={k: reporting.as_list(intra[:, i]) for i, k in enumerate(probes.MODALITIES)},
        cross_modal=reporting.as_list(sums.ratio("cross_sum", "cross_count")),
        exit_probe=dict(
            exit_layer=list(range(1, L + 1)), loss=reporting.as_list(probe_loss),
            token_accuracy=None, answer_accuracy=None, answer_rounds=rounds,
            baseline_loss=reporting.as_list(probe_loss[-1:])[0]),
    )
    if rounds:
        report["exit_probe"]["answer_accuracy"] = reporting.as_list(correct / rounds)
    if float(sums.d.get("probe_tokens", 0)):
        report["exit_probe"]["token_accuracy"] = reporting.as_list(sums.ratio("probe_hit_sum", "probe_tokens"))

    vision_curve = report["intra_modal"]["vision"]
    if window is None and a.ilvas_model == "proposed":
        inj, _ = proposal.pick_injection(vision_curve, a.min_prominence)
        ex, _ = proposal.pick_exit(report["exit_probe"]["loss"], a.tolerance)
        window = (inj, max(ex, min(L, inj + 2)))
        check_window(window, ns, L)
        sums2, *_ = reporting.stream(a, cfg, params, tok, spec, source, curves=False, ilvas=True, ns=ns,
                           topk=topk, vision_on=jnp.asarray(probes.vision_flags(L, *window)),
                           desc="ILVAS")
        sums.d.update({k: v for k, v in sums2.d.items() if k.startswith("ilvas")})
    model_name = ("vanilla" if window is None else
                  f"inject {window[0]} / exit {window[1]} ({a.ilvas_model})")
    window = window or (0, L)
    curves = reporting.ilvas_curves(sums, ns, L, window)
    report["ilvas"] = dict(model=model_name, window=list(window), topk=topk, curves=curves)

    try:
        s, details = proposal.propose(vision_curve=vision_curve,
                                ilvas_curves={int(n): c for n, c in curves.items()},
                                probe_loss=report["exit_probe"]["loss"], num_layers=L, n_vision=N,
                                budget=a.budget, tolerance=a.tolerance, max_cuts=a.max_cuts,
                                min_prominence=a.min_prominence)
        report["proposal"] = dict(proposal.schedule_dict(s), details=details,
                                  config_flags=proposal.config_flags(s), rules=proposal.RULES)
    except ValueError as e:
        s = None
        report["proposal"] = dict(error=str(e), rules=proposal.RULES)
    files = plots.plot_all(report, out)
    if s is not None:
        files += plots.draw_stages(cfg, params, s, first[0], spec, out, a.show)
        (out / "schedule_flags.txt").write_text(proposal.config_flags(s) + "\n")
        (out / "schedule.json").write_text(json.dumps(proposal.schedule_dict(s), indent=1) + "\n")
        (out / "preset.py").write_text(reporting.preset_snippet(s, report))
    report["files"] = [str(Path(f).relative_to(out)) for f in files]
    report["runtime_s"] = round(time.time() - t0, 2)
    (out / "report.json").write_text(json.dumps(reporting.json_safe(report), indent=1))
    print(reporting.summary(report))
    if s is None:
        raise ValueError(report["proposal"]["error"])
    return report


if __name__ == "__main__":
    cli.run(main)
