"""The `shapes_vqa` world: scenes of a few coloured shapes on a mildly textured background, and
single-word question/answer conversations about them. Pure numpy + PIL, no TFDS: the builder in
`shapes_vqa.py` only wraps `make_example`.

Every example is a pure function of (seed, split, index): `np.random.default_rng([seed, split,
index])`, so a split can be generated in any order, in parts, and reproduced bit for bit.

Images are `IMAGE_SIZE`² RGB. Shapes have a radius of 10–20 px (20–40 px across), at most 5 per
image and never overlapping, so with 14-px patches (576 per image) at most ~60 patches touch a
shape and the rest are background. The background is a light grey with a random tint plus two
octaves of smooth noise, so no two background patches are identical.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from hidrop_jax.data.features import IMAGE_QUESTION_TYPES, encode_jpeg

IMAGE_SIZE = 336
MIN_RADIUS, MAX_RADIUS = 10, 20
MAX_SHAPES = 5

COLORS = {  # name -> RGB; saturated, far from each other and from the grey background
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 125, 20),
}
KINDS = ("circle", "square", "triangle", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
          "diamond": "diamonds", "cross": "crosses"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTIONS = ("left", "right", "above", "below")

SPLITS = {"train": 0, "validation": 1, "test": 2}


class Shape(NamedTuple):
    kind: str
    color: str
    x: int       # centre column (pixels)
    y: int       # centre row (pixels)
    radius: int  # half the extent


# ----------------------------------------------------------------------------- scenes

def sample_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[Shape]:
    """1–5 non-overlapping shapes, each (colour, kind) pair at most once."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    pairs = [(c, k) for c in COLORS for k in KINDS]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    shapes: list[Shape] = []
    for j in chosen:
        color, kind = pairs[j]
        for _ in range(100):  # rejection sampling; 5 small shapes always fit quickly
            r = int(rng.integers(MIN_RADIUS, MAX_RADIUS + 1))
            x, y = (int(v) for v in rng.integers(r + 4, size - r - 4, size=2))
            if all((x - s.x) ** 2 + (y - s.y) ** 2 > (r + s.radius + 6) ** 2 for s in shapes):
                shapes.append(Shape(kind, color, x, y, r))
                break
    return shapes


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """int16 [size, size, 3]: a tinted light grey plus two octaves of smooth noise (blobs of
    ~56 px, amplitude ~7, and a patch-scale texture, amplitude ~3), upsampled bicubically by PIL
    from small random grids (integer arithmetic: this is most of the generation time)."""
    from PIL import Image
    base = np.rint(rng.uniform(185.0, 225.0) + rng.uniform(-8.0, 8.0, size=3)).astype(np.int16)
    out = np.broadcast_to(base - 256, (size, size, 3)).astype(np.int16)
    for cells, amp in ((6, 7.0), (40, 3.0)):
        grid = np.clip(np.rint(128 + amp * rng.normal(size=(cells, cells, 3))), 0, 255)
        up = Image.fromarray(grid.astype(np.uint8)).resize((size, size), Image.BICUBIC)
        out += np.asarray(up)
    return out


def shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: int) -> np.ndarray:
    """Boolean mask of a shape of radius r over pixel offsets (dx, dy) from its centre."""
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "triangle":  # apex up; the centre (0, 0) is inside
        h = (dy + r) / (2.0 * r)  # 0 at the apex row, 1 at the base row
        return (h >= 0) & (h <= 1) & (np.abs(dx) <= h * r)
    if kind == "cross":
        t = max(r // 3, 3)
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


def footprint(s: Shape, size: int = IMAGE_SIZE):
    """(box, dx, dy, mask): the shape's bounding box in the image as a (rows, cols) slice pair,
    clipped to the image, the pixel offsets from its centre over that box, and its mask there."""
    y0, y1 = max(s.y - s.radius, 0), min(s.y + s.radius + 1, size)
    x0, x1 = max(s.x - s.radius, 0), min(s.x + s.radius + 1, size)
    dy, dx = np.mgrid[y0 - s.y:y1 - s.y, x0 - s.x:x1 - s.x]
    return (slice(y0, y1), slice(x0, x1)), dx, dy, shape_mask(s.kind, dx, dy, s.radius)


def draw_scene(shapes: list[Shape], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]. Shapes are flat colours with a ±6 shading so they are not flat
    either; each is drawn only inside its own bounding box (vectorised numpy)."""
    img = _background(rng, size)
    for s in shapes:
        box, dx, dy, m = footprint(s, size)
        shade = np.rint(6.0 * (dx + dy) / (2 * s.radius)).astype(np.int16)  # diagonal gradient
        col = np.asarray(COLORS[s.color], np.int16) + shade[..., None]
        img[box] = np.where(m[..., None], col, img[box])
    return np.clip(img, 0, 255).astype(np.uint8)


def nearest_color(rgb) -> str:
    """Palette name nearest to an RGB triple (for checks on decoded, JPEG-compressed images)."""
    names = list(COLORS)
    d = [np.sum((np.asarray(COLORS[c], float) - np.asarray(rgb, float)) ** 2) for c in names]
    return names[int(np.argmin(d))]


# ----------------------------------------------------------------------------- questions

def _relation(a: Shape, b: Shape):
    """Where a is relative to b, if clear: one axis dominates by 2× and by ≥ 30 px."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= max(2 * abs(dy), 30):
        return "right" if dx > 0 else "left"
    if abs(dy) >= max(2 * abs(dx), 30):
        return "below" if dy > 0 else "above"
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _question(qtype: str, shapes: list[Shape], rng: np.random.Generator):
    """(question, answer) of type qtype about the scene, or None if the scene cannot pose it."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]
    if qtype == "color":
        unique = [s for s in shapes if kinds.count(s.kind) == 1]
        if not unique:
            return None
        s = pick(unique)
        return f"what color is the {s.kind} ?", s.color
    if qtype == "shape":
        unique = [s for s in shapes if colors.count(s.color) == 1]
        if not unique:
            return None
        s = pick(unique)
        return f"what shape is the {s.color} object ?", s.kind
    if qtype == "count":
        v = int(rng.integers(3))
        if v == 0:
            return "how many shapes are there ?", NUMBERS[len(shapes)]
        present = rng.random() < 0.7  # mostly about kinds/colours in the scene, else any
        if v == 1:
            k = pick(kinds if present else KINDS)
            return f"how many {PLURAL[k]} are there ?", NUMBERS[kinds.count(k)]
        c = pick(colors if present else list(COLORS))
        return f"how many {c} shapes are there ?", NUMBERS[colors.count(c)]
    if qtype == "exist":
        present = {(s.color, s.kind) for s in shapes}
        if rng.random() < 0.5:
            c, k = sorted(present)[int(rng.integers(len(present)))]
            return f"is there {_article(c)} {c} {k} ?", "yes"
        absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        c, k = pick(absent)
        return f"is there {_article(c)} {c} {k} ?", "no"
    if qtype == "position":
        pairs = [(a, b) for a in shapes for b in shapes if a is not b and _relation(a, b)]
        if not pairs:
            return None
        a, b = pick(pairs)
        return (f"where is the {a.color} {a.kind} relative to the {b.color} {b.kind} ?",
                _relation(a, b))
    raise ValueError(f"unknown question type {qtype!r}")


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above",
             "yes": "no", "no": "yes"}
_SIDES = {"triangle": 3, "square": 4, "diamond": 4}
_MIX = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("blue", "red"): "purple"}


def _text_question(rng: np.random.Generator):
    """A question answerable from text alone (the text-only samples)."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    v = int(rng.integers(4))
    if v == 0:
        w = pick(list(_OPPOSITE))
        return f"what is the opposite of {w} ?", _OPPOSITE[w]
    if v == 1:
        k = pick(list(_SIDES))
        return f"how many corners does a {k} have ?", NUMBERS[_SIDES[k]]
    if v == 2:
        i = int(rng.integers(0, 9))
        return f"what number comes after {NUMBERS[i]} ?", NUMBERS[i + 1]
    a, b = pick(list(_MIX))
    if rng.random() < 0.5:
        a, b = b, a
    return f"what color do you get by mixing {a} and {b} ?", _MIX[tuple(sorted((a, b)))]


def make_conversation(shapes: list[Shape] | None, rng: np.random.Generator, rounds: int):
    """(questions, answers, types): `rounds` distinct questions; text-only when shapes is None."""
    qs, ans, types = [], [], []
    for _ in range(50):
        if len(qs) == rounds:
            break
        if shapes is None:
            qa, t = _text_question(rng), "text"
        else:
            t = IMAGE_QUESTION_TYPES[int(rng.integers(len(IMAGE_QUESTION_TYPES)))]
            qa = _question(t, shapes, rng)
        if qa is None or qa[0] in qs:
            continue
        qs.append(qa[0])
        ans.append(qa[1])
        types.append(t)
    return qs, ans, types


def make_example(seed: int, split: str, index: int, *, text_only_frac: float = 0.03,
                 size: int = IMAGE_SIZE, jpeg_quality: int = 95) -> dict:
    """One example as plain Python/numpy: the dict the TFDS builder yields (image as JPEG bytes).

    A fraction `text_only_frac` of examples has no image (has_image False, a 1×1 black image).
    """
    rng = np.random.default_rng([seed, SPLITS[split], index])
    text_only = rng.random() < text_only_frac  # the first draw: see `is_text_only`
    rounds = int(rng.integers(1, 4))
    if text_only:
        shapes, pixels = [], np.zeros((1, 1, 3), np.uint8)
        qs, ans, types = make_conversation(None, rng, rounds)
    else:
        shapes = sample_scene(rng, size)
        pixels = draw_scene(shapes, rng, size)
        qs, ans, types = make_conversation(shapes, rng, rounds)
    return {
        "id": f"{split}_{index:06d}",
        "image": encode_jpeg(pixels, jpeg_quality),
        "has_image": not text_only,
        "conversations": {"question": qs, "answer": ans, "type": types},
        "objects": {
            "kind": [s.kind for s in shapes], "color": [s.color for s in shapes],
            "x": np.asarray([s.x for s in shapes], np.int32),
            "y": np.asarray([s.y for s in shapes], np.int32),
            "radius": np.asarray([s.radius for s in shapes], np.int32),
        },
    }


def is_text_only(seed: int, split: str, index: int, text_only_frac: float = 0.03) -> bool:
    """Whether `make_example(seed, split, index)` is text-only, without drawing it."""
    return bool(np.random.default_rng([seed, SPLITS[split], index]).random() < text_only_frac)


def vocabulary_texts() -> list[str]:
    """Every word the generator can emit (questions and answers), for the word-level tokenizer:
    the vocabulary is a property of the generator, so it does not depend on which samples a
    small build happened to draw."""
    words = set(NUMBERS) | set(DIRECTIONS) | set(COLORS) | set(KINDS) | set(PLURAL.values())
    words |= {"yes", "no", "object", "shapes", "an"}
    texts = [" ".join(sorted(words))]
    texts += ["what color is the ?", "what shape is the object ?", "how many shapes are there ?",
              "how many are there ?", "is there a ?", "where is the relative to the ?",
              "what is the opposite of ?", "how many corners does a have ?",
              "what number comes after ?", "what color do you get by mixing and ?"]
    return texts
