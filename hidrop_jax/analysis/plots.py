"""The analysis report's pictures: similarity and ILVAS curves, the exit probe, the proposed
schedule, and what it keeps of an image (kept patches framed, dropped ones dimmed)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from hidrop_jax.analysis import probes
from hidrop_jax.batch import first_query_row
from hidrop_jax.families import family
from hidrop_jax.model import forward

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def patch_overlay(image_u8, kept, grid: int, *, cls_token: bool = False, scale: int = 1,
                  dim: float = 0.2):
    """uint8 [H·scale, W·scale, 3]: the image with the dropped patches dimmed to `dim` and a
    1-pixel yellow frame round each kept one. `kept` = vision token indices (original order);
    with `cls_token` index 0 is CLS (no patch)."""
    img = np.asarray(image_u8, np.uint8)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    h, w = img.shape[:2]
    ph, pw = h // grid, w // grid
    keep_mask = np.zeros((grid, grid), bool)
    for t in np.asarray(kept).ravel():
        j = int(t) - (1 if cls_token else 0)
        if 0 <= j < grid * grid:
            keep_mask[j // grid, j % grid] = True
    full = np.repeat(np.repeat(keep_mask, ph, 0), pw, 1)
    full = np.pad(full, ((0, h - full.shape[0]), (0, w - full.shape[1])))
    out = np.where(full[..., None], img, (img * dim).astype(np.uint8))
    for r, c in zip(*np.nonzero(keep_mask)):
        y0, x0, y1, x1 = r * ph, c * pw, (r + 1) * ph - 1, (c + 1) * pw - 1
        out[y0, x0:x1 + 1] = out[y1, x0:x1 + 1] = (255, 220, 0)
        out[y0:y1 + 1, x0] = out[y0:y1 + 1, x1] = (255, 220, 0)
    return out


def display_scale(image_size: int, min_size: int = 224) -> int:
    """Integer upscaling so small images are drawn at ≥ `min_size` pixels."""
    return max(1, math.ceil(min_size / image_size))


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
    layout = family(cfg.model).token_layout(cfg.model)
    if layout is None:  # the tokens do not form a square grid
        return []
    grid, cls, size, image = layout
    scale = display_scale(size)
    d = out / "stages"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for b in np.flatnonzero(np.asarray(inputs.has_image))[:n_show]:
        img = unnormalize(image(np.asarray(inputs.pixels[b])), spec.image_mean, spec.image_std)
        panels = [np.repeat(np.repeat(img, scale, 0), scale, 1)]
        path = d / f"sample{b}_input.png"
        Image.fromarray(panels[0]).save(path)
        files.append(str(path))
        for i, (p, k) in enumerate(zip(schedule.prune_after, schedule.keep)):
            pic = patch_overlay(img, kept[i][b], grid, cls_token=cls, scale=scale)
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
