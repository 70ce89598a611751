"""Pictures of what HiDrop keeps: kept-patch overlays on the input image."""

from __future__ import annotations

import math

import numpy as np


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
