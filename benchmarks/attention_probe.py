"""Can one attention head find the object a question names in the demo's frozen vision tokens,
and how fast, from which initialisation? (what limited `make demo` before `initializer_range`)

The demo's LLM answers "what color is the square ?" by attending from the question to the
patch tokens of the square. This isolates that one step on the real features: the committed
tower (`assets/tiny_shapes_clip`, frozen, LLaVA's feature layer, CLS dropped) on `shapes_vqa`
images, the repo's projector (mlp2x_gelu) and an RMS norm, then a single attention head whose query
is a learned embedding of the named word (a kind for colour questions, a colour for shape
questions) and whose value is read out as the answer. Every weight starts from N(0, std²),
AdamW at the demo's learning rate, batch 16; accuracy on validation images, over objects whose
kind (or colour) is unique in their image, as the dataset's questions are.

    python benchmarks/attention_probe.py [--stds 0.02,0.0884] [--steps 600] [--images 1600]

If this head learns in a few hundred steps, the tokens carry what the questions need and what
is slow in the LLM is composing such steps (question word -> query -> answer row).

It also measures whether the tokens say *where* their patch is (what "where is the red circle
relative to the blue square ?" needs from the values): R² of a least-squares linear map from a
token to its patch's row and column, fitted on half the training tokens, scored on the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVAL_AT = (50, 100, 200, 400, 600, 1000, 2000)


def features(cfg, split: str, n: int):
    """Frozen tower features [images, tokens, width] and each image's (kinds, colours)."""
    import jax

    from hidrop_jax.config import feature_layers_run
    from hidrop_jax.hf.load import load_hf_vision
    from hidrop_jax.data import shapes
    from hidrop_jax.data.image import preprocess
    from hidrop_jax.data.shapes_vqa import ShapesVqa
    from hidrop_jax.layers.clip import vision_hidden_state
    from hidrop_jax.model import vision_dims
    m = cfg.model
    tower = load_hf_vision(cfg, cfg.train.init_vision)
    run = jax.jit(lambda px: vision_hidden_state(vision_dims(m), tower, px, feature_layers_run(m))[:, 1:])
    pix, objs, seed = [], [], ShapesVqa.BUILDER_CONFIGS[0].seed  # the images the demo trains on
    for i in range(n):
        ex = shapes.make_example(seed, split, i)
        if ex["has_image"]:
            pix.append(preprocess(ex["image"], m.vision.image_size))
            objs.append((list(ex["objects"]["kind"]), list(ex["objects"]["color"])))
    feats = np.concatenate([np.asarray(run(np.stack(pix[j:j + 32]))) for j in range(0, len(pix), 32)])
    return feats, objs


def questions(objs, by: str):
    """[(image, named word id, answer id)] for objects whose `by` attribute is unique."""
    from hidrop_jax.data import shapes
    kinds, colors = list(shapes.KINDS), list(shapes.COLORS)
    out = []
    for i, (ks, cs) in enumerate(objs):
        for k, c in zip(ks, cs):
            if by == "kind" and ks.count(k) == 1:
                out.append((i, kinds.index(k), colors.index(c)))
            if by == "color" and cs.count(c) == 1:
                out.append((i, colors.index(c), kinds.index(k)))
    return np.asarray(out)


def probe(train, val, by: str, std: float, steps: int, d: int, lr: float, seed: int = 0):
    """Accuracy of the one-head probe at the steps of EVAL_AT (≤ steps)."""
    import jax
    import jax.numpy as jnp
    import optax

    from hidrop_jax.data import shapes
    from hidrop_jax.layers.projector import Projector
    (f_tr, q_tr), (f_va, q_va) = train, val
    n_words, n_answers = (len(shapes.KINDS), len(shapes.COLORS))[:: 1 if by == "kind" else -1]
    proj = Projector(d, init_std=std)
    rms = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)  # noqa: E731
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    normal = lambda key, shape: std * jax.random.normal(key, shape)  # noqa: E731
    params = dict(proj=proj.init(k[0], f_tr[:1])["params"], words=normal(k[1], (n_words, d)),
                  wk=normal(k[2], (d, d)), wv=normal(k[3], (d, d)), out=normal(k[4], (d, n_answers)))

    def logits(p, f, word):
        h, q = rms(proj.apply({"params": p["proj"]}, f)), rms(p["words"][word])  # as the LLM's norms
        a = jax.nn.softmax(jnp.einsum("bd,bnd->bn", q, h @ p["wk"]) / np.sqrt(d), axis=-1)
        return jnp.einsum("bn,bnd->bd", a, h @ p["wv"]) @ p["out"]

    def loss(p, f, word, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, f, word), y).mean()

    tx = optax.adamw(lr, weight_decay=0.01)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, f, word, y):
        g = jax.grad(loss)(p, f, word, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    acc = jax.jit(lambda p, f, w, y: (logits(p, f, w).argmax(-1) == y).mean())
    rng, curve = np.random.default_rng(seed), {}
    for s in range(1, steps + 1):
        b = q_tr[rng.integers(len(q_tr), size=16)]
        params, opt = step(params, opt, f_tr[b[:, 0]], b[:, 1], b[:, 2])
        if s in EVAL_AT:
            curve[s] = float(acc(params, f_va[q_va[:, 0]], q_va[:, 1], q_va[:, 2]))
    return curve


def position_r2(feats) -> dict:
    """Held-out R² of a linear least-squares fit token -> (row, column) of its patch."""
    n_img, n_tok, _ = feats.shape
    side = int(round(n_tok ** 0.5))
    x = np.c_[feats.reshape(n_img * n_tok, -1), np.ones(n_img * n_tok)]
    half = (n_img // 2) * n_tok  # first half of the images to fit, second half to score
    out = {}
    for name, y in (("row", np.arange(n_tok) // side), ("column", np.arange(n_tok) % side)):
        y = np.tile(y, n_img).astype(np.float64)
        w = np.linalg.lstsq(x[:half], y[:half], rcond=None)[0]
        out[name] = float(1 - np.mean((y[half:] - x[half:] @ w) ** 2) / np.var(y[half:]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stds", default="0.02,0.0884", help="initialisation stds (HF's 0.02; 128^-0.5)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--images", type=int, default=1600, help="training images (validation: 300)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tower", default="", help="a HF CLIPVisionModel directory to probe "
                    "(default: the demo's, assets/tiny_shapes_clip)")
    ap.add_argument("--position-only", action="store_true", help="only the position R² (no heads)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/attention_probe.json"))
    a = ap.parse_args(argv)
    import configs.tiny_shapes as tiny
    cfg = tiny.get_config()
    if a.tower:
        cfg.train.init_vision = str(Path(a.tower).resolve())
    t0 = time.time()
    (f_tr, o_tr), (f_va, o_va) = features(cfg, "train", a.images), features(cfg, "validation", 300)
    rows = []
    for std in (() if a.position_only else (float(s) for s in a.stds.split(","))):
        for by, asks in (("kind", "colour"), ("color", "kind")):
            curve = probe((f_tr, questions(o_tr, by)), (f_va, questions(o_va, by)), by, std,
                          a.steps, cfg.model.text.hidden_size, a.lr)
            rows.append(dict(std=std, find_by=by, answer=asks, accuracy=curve))
            print(f"std {std:<7} find by {by:5s} read {asks:6s}: "
                  + "  ".join(f"{s}: {v:.3f}" for s, v in curve.items()), flush=True)
    pos = position_r2(f_tr)
    print(f"position of a token's patch from the token (linear, held-out R²): row {pos['row']:.3f}, "
          f"column {pos['column']:.3f}")
    out = dict(command=" ".join(sys.argv), tower=cfg.train.init_vision, images=len(f_tr), validation_images=len(f_va),
               seconds=round(time.time() - t0, 1), rows=rows, position_r2=pos)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
