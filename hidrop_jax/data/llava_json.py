"""TFDS builder `llava_json`: LLaVA's conversation JSON (LLaVA-558K / LLaVA-665K format) plus an
image folder, both in `manual_dir`, into the feature spec `shapes_vqa` uses.

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

`image` is relative to `<manual_dir>/<config.image_dir>`; records without it are text-only
(LLaVA-665K has ~40k ShareGPT ones). The `<image>` placeholder is stripped from the text: the
pipeline's templates put the image at the start of the first question, as LLaVA does.

Records are skipped, never a crash, when their image file is missing (`missing_image`) or
cannot be decoded (`corrupt_image`), when their image path leaves `manual_dir` (`unsafe_path`:
`../../etc/passwd` or an absolute path; refused before anything is opened; checked on the
path's text, so a symlinked image folder inside `manual_dir` still works), when they hold more
than one `<image>` tag (`image_tags`: one image per record, as LLaVA-1.5 trains; the tags would
not say which image goes where), and when they are malformed (`malformed`: no human/gpt pair).
The counts are logged and stored in `builder.info.metadata["skipped"]` (with up to 20 example
ids each under `metadata["skipped_ids"]`); `python -m hidrop_jax.data.build` prints them.

    b = LlavaJson(data_dir=d, config=llava_json_config("llava_v1_5_mix665k.json"))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=m))
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from hidrop_jax.data.features import encode_jpeg, feature_spec
from hidrop_jax.data.local_builder import LocalBuilder

log = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = "<image>"
_BLANK_JPEG = None


@dataclasses.dataclass(eq=False)
class LlavaJsonConfig(tfds.core.BuilderConfig):
    json_file: str = "llava_v1_5_mix665k.json"  # relative to manual_dir
    image_dir: str = ""                          # image paths are relative to manual_dir/image_dir
    num_validation: int = 0                      # last N records -> a `validation` split
    question_type: str = "other"                 # `type` of every round (LLaVA data has none)


def llava_json_config(json_file: str, image_dir: str = "", *, num_validation: int = 0,
                      name: str | None = None) -> LlavaJsonConfig:
    stem = os.path.splitext(os.path.basename(json_file))[0]
    if num_validation:  # in the name: another split point is another build, not a stale cache
        stem += f"_val{num_validation}"
    name = name or "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in stem)
    return LlavaJsonConfig(name=name, json_file=json_file, image_dir=image_dir,
                           num_validation=num_validation,
                           description=f"{json_file} with images from {image_dir or '.'}")


def _blank_jpeg() -> bytes:
    global _BLANK_JPEG
    if _BLANK_JPEG is None:
        _BLANK_JPEG = encode_jpeg(np.zeros((1, 1, 3), np.uint8))
    return _BLANK_JPEG


def load_image_bytes(path: str) -> bytes:
    """Bytes of an RGB JPEG/PNG for `path`: the file as is when it already is one, else
    re-encoded. Raises (FileNotFoundError, or PIL's errors) if missing or undecodable."""
    from PIL import Image
    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as im:
        fmt = im.format
        im.load()  # full decode: truncated/corrupt files fail here, not at training time
        if fmt in ("JPEG", "PNG") and im.mode == "RGB":
            return raw
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()


SKIP_REASONS = ("missing_image", "corrupt_image", "unsafe_path", "image_tags", "malformed")


class TooManyImageTags(ValueError):
    pass


def parse_conversation(turns) -> tuple[list[str], list[str]]:
    """LLaVA turns -> (questions, answers), placeholders stripped. Pairs human→gpt turns in
    order; a leading gpt turn or a trailing human turn is dropped. Raises ValueError if no
    pair remains or a turn is malformed, TooManyImageTags for more than one `<image>`."""
    if not isinstance(turns, list):
        raise ValueError("`conversations` is not a list")
    tags = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns
               if isinstance(t, dict) and isinstance(t.get("value"), str))
    if tags > 1:
        raise TooManyImageTags(f"{tags} {IMAGE_PLACEHOLDER} tags (at most one image per record)")
    qs, ans, pending = [], [], None
    for t in turns:
        if not isinstance(t, dict) or "from" not in t or not isinstance(t.get("value"), str):
            raise ValueError(f"malformed turn {t!r:.80}")
        role, value = t["from"], t["value"]
        if role == "human":
            pending = strip_placeholder(value)
        elif role == "gpt" and pending is not None:
            qs.append(pending)
            ans.append(value.strip())
            pending = None
    if not qs:
        raise ValueError("no human→gpt pair")
    return qs, ans


def image_path(manual_dir: str, image_dir: str, rel) -> str:
    """`manual_dir/image_dir/rel`, refusing (ValueError) a path that leaves `manual_dir`:
    absolute, or climbing out with `..`. Decided on the text alone (nothing is opened), so
    symlinks inside `manual_dir` (e.g. `coco -> /datasets/coco`) are followed as usual."""
    if not isinstance(rel, str) or os.path.isabs(rel):
        raise ValueError(f"image path {rel!r} is not relative to manual_dir")
    root = os.path.normpath(os.path.abspath(manual_dir))
    path = os.path.normpath(os.path.join(root, image_dir, rel))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"image path {rel!r} leaves manual_dir {manual_dir}")
    return path


def strip_placeholder(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(
        "\n" + IMAGE_PLACEHOLDER, "").replace(IMAGE_PLACEHOLDER, "").strip()


class LlavaJson(LocalBuilder, tfds.core.GeneratorBasedBuilder):
    """LLaVA conversation JSON + images from manual_dir (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        llava_json_config("blip_laion_cc_sbu_558k.json", "images", name="pretrain_558k"),
        llava_json_config("llava_v1_5_mix665k.json", "", name="mix665k"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """Put the conversation JSON (config.json_file) in manual_dir
    and its images under manual_dir/config.image_dir, e.g. for LLaVA-1.5: blip_laion_cc_sbu_558k.json
    + images/ (stage 1), llava_v1_5_mix665k.json + coco/ gqa/ ocr_vqa/ textvqa/ vg/ (stage 2)."""

    def __init__(self, *, file_format="array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA conversation JSON (558K / 665K format) with local images.",
            features=tfds.features.FeaturesDict(feature_spec()),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        path = os.path.join(dl_manager.manual_dir, c.json_file)
        with open(path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        manual = str(dl_manager.manual_dir)
        self._skipped = {k: 0 for k in SKIP_REASONS}
        self._skipped_ids = {k: [] for k in self._skipped}
        n_val = min(c.num_validation, len(records))
        splits = {"train": self._generate_examples(records, 0, len(records) - n_val, manual)}
        if n_val:
            splits["validation"] = self._generate_examples(
                records, len(records) - n_val, len(records), manual)
        return splits

    def _skip(self, why: str, rid: str, detail: str):
        self._skipped[why] += 1
        if len(self._skipped_ids[why]) < 20:
            self._skipped_ids[why].append(rid)
        log.warning("llava_json: skipping record %s (%s): %s", rid, why, detail)
        self.info.metadata["skipped"] = dict(self._skipped)
        self.info.metadata["skipped_ids"] = {k: list(v) for k, v in self._skipped_ids.items()}

    def _generate_examples(self, records, start: int, stop: int, manual_dir: str):
        c = self.builder_config
        self.info.metadata.setdefault("skipped", dict(self._skipped))
        for i in range(start, stop):
            rec = records[i]
            rid = str(rec.get("id", i)) if isinstance(rec, dict) else str(i)
            try:
                if not isinstance(rec, dict):
                    raise ValueError("record is not an object")
                qs, ans = parse_conversation(rec.get("conversations"))
            except TooManyImageTags as e:
                self._skip("image_tags", rid, str(e))
                continue
            except ValueError as e:
                self._skip("malformed", rid, str(e))
                continue
            has_image = bool(rec.get("image"))
            image = _blank_jpeg()
            if has_image:
                try:
                    path = image_path(manual_dir, c.image_dir, rec["image"])
                except ValueError as e:
                    self._skip("unsafe_path", rid, str(e))
                    continue
                try:
                    image = load_image_bytes(path)
                except FileNotFoundError:
                    self._skip("missing_image", rid, path)
                    continue
                except Exception as e:  # PIL raises many types for bad files
                    self._skip("corrupt_image", rid, f"{path}: {type(e).__name__}: {e}")
                    continue
            yield str(i), {
                "id": rid,
                "image": image,
                "has_image": has_image,
                "conversations": {"question": qs, "answer": ans,
                                  "type": [c.question_type] * len(qs)},
            }
        if sum(self._skipped.values()):
            log.warning("llava_json: skipped so far %s", self._skipped)
