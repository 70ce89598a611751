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


def make_batch(seed: int, n: int, patch: int, min_cover: float) -> dict:
    """Freshly drawn scenes (never a repeat): pixels [n, H, W, 3], kind and colour per patch."""
    from PIL import Image

    from hidrop_jax.data import shapes
    from hidrop_jax.data.image import preprocess
    from hidrop_jax.pretrain_tower import dense_labels
    rng = np.random.default_rng(seed)
    xs, kinds, cols = [], [], []
    for _ in range(n):
        scene = shapes.sample_scene(rng)
        xs.append(preprocess(Image.fromarray(shapes.draw_scene(scene, rng)), shapes.IMAGE_SIZE))
        kind, color = dense_labels(scene, patch, shapes.IMAGE_SIZE, min_cover)
        kinds.append(kind)
        cols.append(color)
    return {"pixels": np.stack(xs), "kind": np.stack(kinds), "color": np.stack(cols)}


def run_tower(name: str, steps: int, batch: int, lr: float, eval_every: int, min_cover: float,
              save_dir: str | None = None):
    """Train one model on fresh scenes (`pretrain_tower.train_dense`, the objective of
    `python -m hidrop_jax.pretrain_tower`); its accuracy curve on held-out object tokens. With
    `save_dir`, the trained tower's parameters go to <save_dir>/<name>.npz ('/'-joined keys)."""
    import jax

    from hidrop_jax.data import shapes
    from hidrop_jax.pretrain_tower import majority_kind, train_dense

    model, patch, width, layers = parse_tower(name)
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    tower, features = init_features(model, patch, width, layers, k0)
    held_out = [make_batch(10**6 + i, 32, patch, min_cover) for i in range(2)]
    t0 = time.time()
    tower, curve = train_dense(features, tower, width, (make_batch(s, batch, patch, min_cover) for s in range(steps)),
                               steps, lr=lr, held_out=held_out, eval_every=eval_every, name=name,
                               head_keys=(k1, k2))
    if save_dir:
        from flax.traverse_util import flatten_dict
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        flat = flatten_dict(tower, sep="/")
        np.savez(Path(save_dir) / f"{name}.npz", **{k: np.asarray(v) for k, v in flat.items()})
    return {"tower": name, "model": model, "patch": patch, "width": width, "layers": layers,
            "tokens": (shapes.IMAGE_SIZE // patch) ** 2, "kind_majority": majority_kind(held_out),
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
