"""How fast can a CLIP tower trained from scratch learn the `shapes_vqa` world? (what limits the demo)

The tiny LLaVA of `make demo` answers colour and shape questions at chance: nearly every image
question names or asks for the *kind* of a shape ("what color is the square ?", "what shape is
the red object ?"). This benchmark isolates the vision tower, with the most favourable
supervision there is: the tower alone, a per-token linear head that predicts for every patch
token the kind and the colour of the object covering it (or background), losses balanced between
object and background tokens, on freshly drawn scenes of the dataset's distribution (never a
repeat). The model-side parts are the repo's own (`init_vision`, `vision_hidden_state`, LLaVA's
penultimate layer); scenes and preprocessing are the dataset's.

    python benchmarks/vision_probe.py [--towers mlp256,p28w64l3,p28w128l4,p14w64l3] [--steps 600]

Towers: p<patch>w<width>l<layers>, a CLIP ViT (336×336 images; MLP = 2 × width; 4 heads; the
demo's is p28w64l3), and mlp<width>, the reference: a plain 2-layer MLP on each 28-px patch's
pixels alone, to show the labels are learnable from one patch. Accuracy is over the object
tokens of 64 held-out scenes; chance is 0.20 for kind (5 kinds; the most frequent kind covers a
bit more, printed as "majority") and 0.17 for colour (6).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKGROUND = -1


def parse_tower(name: str):
    """'p28w64l3' -> ('clip', 28, 64, 3); 'mlp256' -> ('mlp', 28, 256, 2)."""
    m = re.fullmatch(r"p(\d+)w(\d+)l(\d+)", name)
    if m:
        return ("clip", *(int(g) for g in m.groups()))
    m = re.fullmatch(r"mlp(\d+)", name)
    if m:
        return ("mlp", 28, int(m.group(1)), 2)
    raise SystemExit(f"--towers: {name!r} is neither p<patch>w<width>l<layers> (e.g. p28w64l3) "
                     "nor mlp<width> (e.g. mlp256)")


def init_features(model: str, patch: int, width: int, layers: int, rng):
    """(params, features(params, pixels) -> [B, patches, width]) for a CLIP tower (LLaVA's
    penultimate layer, CLS dropped) or the reference: a plain 2-layer MLP on each patch's pixels
    (fan-in init), which sees exactly what the tower's patch embedding sees and nothing else."""
    import jax
    from flax.core import meta

    from hidrop_jax.data import shapes
    from hidrop_jax.layers.clip import VisionDims, init_vision, vision_hidden_state
    if model == "clip":
        dims = VisionDims(shapes.IMAGE_SIZE, patch, 3, width, 2 * width, layers, 4, 1e-5, "quick_gelu")
        return (meta.unbox(init_vision(dims, rng)),
                lambda p, x: vision_hidden_state(dims, p, x, layers - 1)[:, 1:])
    d_in, g = patch * patch * 3, shapes.IMAGE_SIZE // patch
    k1, k2 = jax.random.split(rng)
    params = {"w1": jax.random.normal(k1, (d_in, width)) / np.sqrt(d_in), "b1": np.zeros(width),
              "w2": jax.random.normal(k2, (width, width)) / np.sqrt(width), "b2": np.zeros(width)}

    def mlp(p, x):
        x = x.reshape(x.shape[0], g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
        h = jax.nn.gelu(x.reshape(x.shape[0], g * g, d_in) @ p["w1"] + p["b1"])
        return jax.nn.gelu(h @ p["w2"] + p["b2"])
    return params, mlp


def patch_labels(scene, patch: int, size: int, min_cover: float):
    """Per patch (row-major): index of the object covering ≥ min_cover of it, else BACKGROUND."""
    from hidrop_jax.data import shapes
    owner = np.full((size, size), BACKGROUND, np.int32)
    for i, s in enumerate(scene):
        box, _, _, mask = shapes.footprint(s, size)
        owner[box][mask] = i
    g = size // patch
    cells = owner.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    out = np.full(g * g, BACKGROUND, np.int32)
    for i in range(len(scene)):
        out[(cells == i).mean(1) >= min_cover] = i
    return out


def make_batch(seed: int, n: int, patch: int, min_cover: float):
    """pixels [n, H, W, 3], kind and colour labels [n, patches] (background = last class)."""
    from PIL import Image

    from hidrop_jax.data import shapes
    from hidrop_jax.data.image import preprocess
    rng = np.random.default_rng(seed)
    size, colors = shapes.IMAGE_SIZE, list(shapes.COLORS)
    xs, kinds, cols = [], [], []
    for _ in range(n):
        scene = shapes.sample_scene(rng)
        xs.append(preprocess(Image.fromarray(shapes.draw_scene(scene, rng)), size))
        owner = patch_labels(scene, patch, size, min_cover)
        kind_of = np.asarray([shapes.KINDS.index(s.kind) for s in scene] + [len(shapes.KINDS)])
        col_of = np.asarray([colors.index(s.color) for s in scene] + [len(colors)])
        kinds.append(kind_of[owner])  # owner = -1 picks the trailing background class
        cols.append(col_of[owner])
    return np.stack(xs), np.stack(kinds), np.stack(cols)


def run_tower(name: str, steps: int, batch: int, lr: float, eval_every: int, min_cover: float,
              save_dir: str | None = None):
    """Train one model on fresh scenes; its accuracy curve on held-out object tokens. With
    `save_dir`, the trained tower's parameters go to <save_dir>/<name>.npz ('/'-joined keys)."""
    import jax
    import jax.numpy as jnp
    import optax

    from hidrop_jax.data import shapes

    model, patch, width, layers = parse_tower(name)
    n_kind, n_col = len(shapes.KINDS), len(shapes.COLORS)
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    tower, features = init_features(model, patch, width, layers, k0)
    params = {"tower": tower,
              "kind": 0.02 * jax.random.normal(k1, (width, n_kind + 1)),
              "color": 0.02 * jax.random.normal(k2, (width, n_col + 1))}

    def heads(p, x):
        h = jax.nn.standardize(features(p["tower"], x), axis=-1)
        return h @ p["kind"], h @ p["color"]

    def loss_fn(p, x, kind, col):
        lk, lc = heads(p, x)
        xent = (optax.softmax_cross_entropy_with_integer_labels(lk, kind)
                + optax.softmax_cross_entropy_with_integer_labels(lc, col))
        obj = (kind < n_kind).astype(jnp.float32)
        return (xent * obj).sum() / obj.sum() + (xent * (1 - obj)).sum() / (1 - obj).sum()

    lr_schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(30, steps // 10), steps, 0.05 * lr)
    tx = optax.adamw(lr_schedule, weight_decay=0.01)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, x, kind, col):
        loss, g = jax.value_and_grad(loss_fn)(p, x, kind, col)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    @jax.jit
    def correct(p, x, kind, col):
        lk, lc = heads(p, x)
        obj = kind < n_kind
        return ((lk.argmax(-1) == kind) & obj).sum(), ((lc.argmax(-1) == col) & obj).sum(), obj.sum()

    held_out = [make_batch(10**6 + i, 32, patch, min_cover) for i in range(2)]
    kinds = np.concatenate([b[1].ravel() for b in held_out])
    majority = np.bincount(kinds[kinds < n_kind], minlength=n_kind).max() / (kinds < n_kind).sum()
    curve, losses, t0 = [], [], time.time()
    for s in range(steps):
        params, opt, loss = step(params, opt, *make_batch(s, batch, patch, min_cover))
        losses.append(float(loss))
        if (s + 1) % eval_every == 0 or s + 1 == steps:
            ck, cc, n = np.sum([np.asarray(correct(params, *b)) for b in held_out], 0)
            curve.append({"step": s + 1, "images": (s + 1) * batch, "loss": float(np.mean(losses[-eval_every:])),
                          "kind_acc": float(ck / n), "color_acc": float(cc / n)})
            print(f"  {name} step {s + 1:5d}  loss {curve[-1]['loss']:.3f}  kind {ck / n:.3f}  "
                  f"colour {cc / n:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    if save_dir:
        from flax.traverse_util import flatten_dict
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        flat = flatten_dict(jax.device_get(params["tower"]), sep="/")
        np.savez(Path(save_dir) / f"{name}.npz", **{k: np.asarray(v) for k, v in flat.items()})
    return {"tower": name, "model": model, "patch": patch, "width": width, "layers": layers,
            "tokens": (shapes.IMAGE_SIZE // patch) ** 2, "kind_majority": float(majority),
            "seconds": round(time.time() - t0, 1), "curve": curve}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--towers", default="mlp256,p28w64l3,p28w128l4,p14w64l3")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--min-cover", type=float, default=0.2, help="fraction of a patch an object must cover")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision_probe.json"))
    ap.add_argument("--save-dir", default=None, help="write each trained tower's parameters here")
    a = ap.parse_args(argv)
    towers = a.towers.split(",")
    for t in towers:
        parse_tower(t)
    results = [run_tower(t, a.steps, a.batch, a.lr, a.eval_every, a.min_cover, a.save_dir) for t in towers]
    print("\n| tower | tokens | images seen | kind acc | kind majority class | colour acc | s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        last = r["curve"][-1]
        print(f"| {r['tower']} | {r['tokens']} | {last['images']} | {last['kind_acc']:.3f} | "
              f"{r['kind_majority']:.3f} | {last['color_acc']:.3f} | {r['seconds']:.0f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
