"""The record schema every dataset writes (shapes_vqa, llava_json) and the pipeline reads.

Question types are in a fixed order: their index is the `round_type` id the pipeline emits.
"text" = text-only questions (no image); "other" = anything from a foreign dataset.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

QUESTION_TYPES = ("color", "shape", "count", "exist", "position", "text", "other")
IMAGE_QUESTION_TYPES = QUESTION_TYPES[:5]


def feature_spec() -> dict:
    """The feature spec shared by the builders (shapes_vqa adds its own `objects`)."""
    return {
        "id": tfds.features.Text(),
        # Text-only samples carry a 1×1 black image and has_image False.
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "has_image": np.bool_,
        "conversations": tfds.features.FeaturesDict({
            "question": tfds.features.Sequence(tfds.features.Text()),
            "answer": tfds.features.Sequence(tfds.features.Text()),
            "type": tfds.features.Sequence(tfds.features.Text()),
        }),
    }


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
