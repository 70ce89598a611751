"""TFDS builder `shapes_vqa`: the bundled, offline, seed-determined VQA dataset (see `shapes.py`).

ArrayRecord files, read without TensorFlow through `builder.as_data_source(split)`:

    from hidrop_jax.data.shapes_vqa import ShapesVqa, shapes_config
    b = ShapesVqa(data_dir=d, config=shapes_config(train=40, validation=10, test=10))
    b.download_and_prepare()
    b.as_data_source("train")[0]   # {'image': uint8 [336,336,3], 'has_image': True, ...}

Named configs: `default` (20,000 / 1,000 / 1,000, seed 0) and `small` (2,000 / 200 / 200).
`shapes_config(...)` makes any other size/seed; its name encodes them, so builds of different
sizes live side by side in one data_dir (`<data_dir>/shapes_vqa/<config>/<version>/`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from hidrop_jax.data import shapes
from hidrop_jax.data.features import QUESTION_TYPES, feature_spec

_DESCRIPTION = """Synthetic VQA: 336x336 images of 1-5 coloured shapes on a textured background,
1-3 single-word question/answer rounds per image (color, shape, count, exist, position), a few
percent text-only samples. Generated offline from a seed."""


@dataclasses.dataclass(eq=False)
class ShapesVqaConfig(tfds.core.BuilderConfig):
    seed: int = 0
    num_train: int = 20_000
    num_validation: int = 1_000
    num_test: int = 1_000
    text_only_frac: float = 0.03
    jpeg_quality: int = 95


def shapes_config(train: int = 20_000, validation: int = 1_000, test: int = 1_000, *,
                  seed: int = 0, text_only_frac: float = 0.03) -> ShapesVqaConfig:
    """A config of any size; the canonical one (20k/1k/1k, seed 0) keeps the name `default`."""
    for field, v in (("train", train), ("validation", validation), ("test", test)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"shapes_vqa split size `{field}` = {v!r}; allowed: an int ≥ 0")
    if not 0.0 <= text_only_frac <= 1.0:
        raise ValueError(f"shapes_vqa `text_only_frac` = {text_only_frac!r}; allowed: [0, 1]")
    for c in ShapesVqa.BUILDER_CONFIGS:
        if (c.num_train, c.num_validation, c.num_test, c.seed, c.text_only_frac) == (
                train, validation, test, seed, text_only_frac):
            return c
    name = f"s{seed}_{train}_{validation}_{test}"
    if text_only_frac != 0.03:
        name += f"_t{round(text_only_frac * 1000)}"
    return ShapesVqaConfig(name=name, seed=seed, num_train=train, num_validation=validation,
                           num_test=test, text_only_frac=text_only_frac,
                           description=f"{train}/{validation}/{test} examples, seed {seed}")


class ShapesVqa(tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes VQA (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesVqaConfig(name="default", description="20,000 / 1,000 / 1,000 examples, seed 0"),
        ShapesVqaConfig(name="small", num_train=2_000, num_validation=200, num_test=200,
                        description="2,000 / 200 / 200 examples, seed 0"),
    ]

    def __init__(self, *, file_format="array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = feature_spec()
        spec["objects"] = tfds.features.Sequence({   # ground truth, for checks and analysis
            "kind": tfds.features.Text(),
            "color": tfds.features.Text(),
            "x": np.int32, "y": np.int32, "radius": np.int32,
        })
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(spec),
            metadata=tfds.core.MetadataDict(
                seed=c.seed, text_only_frac=c.text_only_frac, image_size=shapes.IMAGE_SIZE,
                question_types=list(QUESTION_TYPES)),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {s: self._generate_examples(s, n) for s, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        for i in range(n):
            ex = shapes.make_example(c.seed, split, i, text_only_frac=c.text_only_frac,
                                     jpeg_quality=c.jpeg_quality)
            yield ex["id"], ex
