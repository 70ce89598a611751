"""LLaVA-1.5 image preprocessing ("pad" aspect ratio): pad to a square with the CLIP mean colour,
resize to the vision tower's size (bicubic, PIL), scale to [0, 1], normalise with CLIP's mean and
std. Output NHWC float32, which is what `hidrop_jax.model.Inputs.pixels` takes.

Equivalent to LLaVA's `expand2square(img, tuple(int(x * 255) for x in image_mean))` followed by
`CLIPImageProcessor` (shortest_edge = crop = size); tests compare with transformers' processor.
"""

from __future__ import annotations

import io

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode(image) -> "PIL.Image.Image":  # noqa: F821
    """Encoded bytes, a uint8 HWC array or a PIL image -> an RGB PIL image (fully decoded)."""
    from PIL import Image
    if isinstance(image, (bytes, bytearray)):
        im = Image.open(io.BytesIO(image))
        im.load()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image array must be uint8 [H, W, 1|3|4]; got {image.dtype} "
                             f"{image.shape}")
        im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    else:
        im = image
    if im.width < 1 or im.height < 1:
        raise ValueError(f"empty image {im.size}")
    return im.convert("RGB") if im.mode != "RGB" else im


def expand2square(im, fill):
    """LLaVA's expand2square: centre the image on a square canvas of colour `fill`."""
    from PIL import Image
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), tuple(fill))
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess(image, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """-> float32 [image_size, image_size, 3], normalised."""
    from PIL import Image
    im = expand2square(decode(image), [int(x * 255) for x in mean])
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scale, shift = (1 / (255 * std)).astype(np.float32), (mean / std).astype(np.float32)
    return np.asarray(im, np.float32) * scale - shift  # = (x / 255 - mean) / std
