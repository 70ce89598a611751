"""Examples -> the model's native batch, and the grain loader around it.

One example (`encode_example`) becomes static-shape numpy arrays (T = `max_len`, Q =
`num_queries`, N = `n_vision`):

    text_ids    [T] int32  text stream without image tokens: <s> + text before the image + text
                           after it, right-padded with the tokenizer's pad id
    text_pos    [T] int32  persistent positions: row j has position j before the image and
                           j + N from the image on (the image holds image_slot .. image_slot+N-1);
                           padding rows continue the count, so positions are strictly increasing
    text_valid  [T] bool
    image_slot  []  int32  rows before the image (= position of the first vision slot); 0 if none
    has_image   []  bool
    pixels      [H, W, 3] float32 (CLIP-normalised; zeros for a sample without an image);
                Qwen2.5-VL: the processor's patches [S, C·T·P·P] at the config's fixed grid;
                with `model.vision.buckets`, bucketed [gh/m, gw/m, m²·C·T·P·P] at the grid of
                the bucket nearest the image's aspect ratio (an image-less sample: the first
                bucket's, zeros); batches then hold one bucket each (`BucketBatch`)
    vision_valid [N] bool  bucketed Qwen2.5-VL only: the n_b slots the image fills (the rest
                           dead); the text after the image keeps its order positions +N
    text_rope   [3, T] int32  Qwen2.5-VL only: M-RoPE rows (t, h, w) of the text rows and of
    vision_rope [3, N] int32  the vision slots, as HF's `get_rope_index` numbers the full
                              sequence (text after the image resumes at start + max(h, w))
    labels      [T] int32  the token that follows row j in the full sequence where that token is
                           an answer token, else IGNORE (-100). The row just before the image
                           has none (its successor is a vision token).
    loss_mask   [T] bool   labels != IGNORE
    label_round [T] int32  conversation round of each label (-1 none), for per-question accuracy
    query_idx   [Q] int32  per round, the row whose label is the round's first answer token (the
                           last text token before the answer), for HiDrop scoring; padded with 0
    query_valid [Q] bool
    round_type  [Q] int32  index into `features.QUESTION_TYPES` (-1 padding)
    answer_text [Q] <U64   the answers (evaluation / debugging; not for the device)
    id          []  <U64   the record's id
    truncated   []  bool   the text did not fit in T (rows past T dropped; the label of row T-1
                           still names token T, so no answer token that had a row is lost)
    skipped_before [] int32 corrupt/undecodable records dropped just before this one
    example_valid  [] bool  False only for padding rows of a final eval batch

`hidrop_jax.batch.to_inputs(batch)` turns a batch into the model's `Inputs` + `Targets`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Iterator, Optional

import grain.python as grain
import ml_collections
import numpy as np

from hidrop_jax.config import n_vision_tokens
from hidrop_jax.data import image as image_lib
from hidrop_jax.data import templates
from hidrop_jax.data.features import QUESTION_TYPES
from hidrop_jax.families import family

log = logging.getLogger(__name__)
IGNORE = -100
ANSWER_CHARS = 64


@dataclasses.dataclass(frozen=True)
class TextImageSpec:
    """Static shapes and the template: everything `encode_example` needs besides the data."""
    template: str = "v1"        # "plain" (stage 1) | "v1" (stage 2)
    max_len: int = 128          # T, text rows (image tokens not counted)
    num_queries: int = 4        # Q, query rows for HiDrop scoring (rounds beyond Q: no query)
    n_vision: int = 576         # N, vision slots the image occupies in the position space
    image_size: int = 336       # H = W of `pixels` (LLaVA)
    image_mean: tuple = image_lib.CLIP_MEAN
    image_std: tuple = image_lib.CLIP_STD
    # `cfg.model.family` and `cfg.model.vision` as sorted (key, value) pairs (hashable, picklable
    # for grain workers): what the family's `example_vision` reads (Qwen2.5-VL: its fixed grid
    # sets the patches and the M-RoPE rows; LLaVA reads only the fields above).
    family: str = "llava"
    vision: tuple = ()

    def __post_init__(self):
        if self.template not in templates.TEMPLATES:
            raise ValueError(f"data template {self.template!r} unknown; allowed: "
                             f"{templates.TEMPLATES}")
        for f in ("max_len", "num_queries", "image_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"data `{f}` = {getattr(self, f)!r}; allowed: an int ≥ 1")
        if not isinstance(self.n_vision, int) or self.n_vision < 0:
            raise ValueError(f"data `n_vision` = {self.n_vision!r}; allowed: an int ≥ 0")

    @classmethod
    def for_model(cls, model_cfg, **kw) -> "TextImageSpec":
        """n_vision, image_size, the family and its vision config from a model config (`cfg.model`)."""
        v = model_cfg.vision.to_dict()
        size = v["image_size"]  # LLaVA: an int; Qwen2.5-VL: [height, width]
        return cls(n_vision=n_vision_tokens(model_cfg),
                   image_size=max(size) if isinstance(size, (list, tuple)) else size,
                   family=family(model_cfg).name,
                   vision=tuple(sorted((k, _hashable(x)) for k, x in v.items())),
                   **kw)


def _hashable(x):
    return tuple(_hashable(y) for y in x) if isinstance(x, (list, tuple)) else x


@functools.lru_cache(maxsize=8)
def _spec_model(family: str, vision: tuple):
    """The part of `cfg.model` that a family's `example_vision` reads (from the spec)."""
    return ml_collections.ConfigDict(dict(family=family, vision=dict(vision)))


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _tokenize(tokenizer, text: str):
    if not text:
        return [], []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), list(enc["offset_mapping"])


def encode_text(tokenizer, spec: TextImageSpec, questions, answers, types, has_image: bool):
    """The text part of `encode_example` (no pixels): a dict of the arrays listed above."""
    T, Q, N = spec.max_len, spec.num_queries, spec.n_vision
    questions, answers = [_str(q) for q in questions], [_str(a) for a in answers]
    types = [_str(t) for t in types] if types is not None else ["other"] * len(questions)
    r = templates.render(spec.template, questions, answers, has_image)
    before, _ = _tokenize(tokenizer, r.before)
    after, offsets = _tokenize(tokenizer, r.after)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = bos + before + after
    rounds = [-1] * (len(bos) + len(before))
    for s, e in offsets:  # a token belongs to the answer span it overlaps
        rounds.append(next((k for k, (a, b) in enumerate(r.spans) if s < b and e > a), -1))
    image_row = len(bos) + len(before) if has_image else -1
    n_full, n = len(ids), min(len(ids), T)

    ids_a = np.asarray(ids, np.int64)
    rounds_a = np.asarray(rounds, np.int64)
    text_ids = np.full(T, tokenizer.pad_token_id, np.int32)
    text_ids[:n] = ids_a[:n]
    rows = np.arange(T)
    text_pos = (rows + (N if has_image else 0) * (rows >= image_row)).astype(np.int32)
    labels = np.full(T, IGNORE, np.int32)
    label_round = np.full(T, -1, np.int32)
    j = np.arange(min(n, n_full - 1))              # rows with a successor
    is_label = (rounds_a[j + 1] >= 0) & (j + 1 != image_row)
    labels[j[is_label]] = ids_a[j + 1][is_label]
    label_round[j[is_label]] = rounds_a[j + 1][is_label]

    query_idx = np.zeros(Q, np.int32)
    query_valid = np.zeros(Q, bool)
    round_type = np.full(Q, -1, np.int32)
    answer_text = np.full(Q, "", f"<U{ANSWER_CHARS}")
    k = 0
    overflow = 0
    for rd in range(len(r.spans)):
        first = np.flatnonzero(rounds_a == rd)
        if not len(first):
            continue
        a = int(first[0])
        q = a if a == image_row else a - 1         # no text row predicts it: use its own row
        if q >= n:
            continue                               # truncated away
        if k == Q:
            overflow += 1
            continue
        query_idx[k], query_valid[k] = q, True
        t = types[rd] if types[rd] in QUESTION_TYPES else "other"
        round_type[k] = QUESTION_TYPES.index(t)
        answer_text[k] = answers[rd][:ANSWER_CHARS]
        k += 1
    return {
        "text_ids": text_ids, "text_pos": text_pos, "text_valid": rows < n,
        "image_slot": np.int32(max(image_row, 0)), "has_image": np.bool_(has_image),
        "labels": labels, "loss_mask": labels != IGNORE, "label_round": label_round,
        "query_idx": query_idx, "query_valid": query_valid, "round_type": round_type,
        "answer_text": answer_text, "truncated": np.bool_(n_full > T),
        "query_overflow": np.int32(overflow),
    }


def encode_example(record: dict, tokenizer, spec: TextImageSpec) -> dict:
    """A TFDS record (image decoded or as encoded bytes) -> the arrays listed in the module doc.
    Raises on anything undecodable (the loader turns that into a counted skip)."""
    has_image = bool(record["has_image"])
    conv = record["conversations"]
    out = encode_text(tokenizer, spec, conv["question"], conv["answer"], conv.get("type"),
                      has_image)
    m = _spec_model(spec.family, spec.vision)
    out.update(family(m).example_vision(m, record, out, spec, has_image))
    out["id"] = np.asarray(_str(record.get("id", ""))[:ANSWER_CHARS], f"<U{ANSWER_CHARS}")
    out["skipped_before"] = np.int32(0)
    out["example_valid"] = np.bool_(True)
    return out


# ----------------------------------------------------------------------------- grain

class BucketBatch:
    """A grain operation (in place of `grain.Batch`): batches whose examples share one pixels
    shape (one image bucket), so a jitted step sees at most one shape per bucket. Examples wait
    in a buffer per bucket; a buffer is emitted when full (at the end, partial ones unless
    `drop_remainder`, in bucket order). A grain checkpoint holds the position of the last
    example read: on resume the examples then waiting in buffers (fewer than
    buckets × batch_size) are skipped."""

    def __init__(self, batch_size: int, drop_remainder: bool):
        self.batch_size, self.drop_remainder = batch_size, drop_remainder

    @staticmethod
    def _stack(examples):
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def __call__(self, records):
        buffers, last = {}, None
        for r in records:
            last = r.metadata
            buf = buffers.setdefault(r.data["pixels"].shape, [])
            buf.append(r.data)
            if len(buf) == self.batch_size:
                yield grain.Record(last.remove_record_key(), self._stack(buf))
                buf.clear()
        if not self.drop_remainder:
            for buf in buffers.values():
                if buf:
                    yield grain.Record(last.remove_record_key(), self._stack(buf))


class Stats:
    """Counters of one loader (exact with worker_count=0; with worker processes use the
    per-batch fields `skipped_before` and `truncated`, which travel with the data)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = {"records": 0, "examples": 0, "skipped": 0, "truncated": 0,
                       "query_overflow": 0}
        self.errors: list[str] = []

    def add(self, **kw):
        with self._lock:
            for k, v in kw.items():
                self.counts[k] += int(v)

    def __getstate__(self):  # picklable for grain worker processes (the lock is not)
        return {"counts": dict(self.counts), "errors": list(self.errors)}

    def __setstate__(self, state):
        self.__init__()
        self.counts.update(state["counts"])
        self.errors = state["errors"]

    def __repr__(self):
        return f"Stats({self.counts})"


class SafeSource:
    """A random-access source whose failing reads become `{"_error": ...}` records."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except Exception as e:  # a corrupt/unreadable record: counted and skipped downstream
            return {"_error": f"read {index}: {type(e).__name__}: {e}"}

    def __repr__(self):
        return f"SafeSource({self.source!r})"


class Encode(grain.MapTransform):
    """Encodes a record; a failure gives None (dropped by `DropSkipped`), is counted, and is
    reported in the next good example's `skipped_before` (so the count survives worker
    processes and batching)."""

    def __init__(self, tokenizer, spec: TextImageSpec, stats: Stats):
        self.tokenizer, self.spec, self.stats = tokenizer, spec, stats
        self.pending = 0

    def map(self, record):
        stats = self.stats
        stats.add(records=1)
        err = record.get("_error") if isinstance(record, dict) else "not a dict"
        if err is None:
            try:
                out = encode_example(record, self.tokenizer, self.spec)
            except Exception as e:  # undecodable image, malformed conversation, ...
                err = f"{_str(record.get('id', '?'))}: {type(e).__name__}: {e}"
        if err is not None:
            self.pending += 1
            stats.add(skipped=1)
            if len(stats.errors) < 100:
                stats.errors.append(err)
            log.warning("data: skipping a corrupt record (%s)", err)
            return None
        out["skipped_before"] = np.int32(self.pending)
        self.pending = 0
        stats.add(examples=1, truncated=out["truncated"], query_overflow=out["query_overflow"])
        return out


class DropSkipped(grain.FilterTransform):
    def filter(self, element):
        return element is not None


def _shard_options(shard_index, shard_count, drop_remainder: bool):
    if shard_index is None or shard_count is None:
        import jax
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for shard_count {shard_count}")
    return grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                              drop_remainder=drop_remainder)


class Loader:
    """A grain `DataLoader` over a data source plus its `Stats`.

    `iter(loader)` is a grain `DataLoaderIterator`: `get_state()` -> bytes, `set_state(bytes)`
    resumes at the same element; orbax saves it with `grain.PyGrainCheckpointSave(it)` /
    restores with `grain.PyGrainCheckpointRestore(it)` (handler `grain.PyGrainCheckpointHandler`).
    """

    def __init__(self, source, tokenizer, spec: TextImageSpec, *, batch_size: int,
                 seed: int = 0, shuffle: bool = True, num_epochs: Optional[int] = None,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                 drop_remainder: bool = True, worker_count: int = 0,
                 stats: Optional[Stats] = None):
        if len(source) == 0:
            raise ValueError("data source is empty")
        self.spec = spec
        self.stats = Stats() if stats is None else stats
        self.shard_options = _shard_options(shard_index, shard_count, drop_remainder)
        self.sampler = grain.IndexSampler(
            num_records=len(source), shard_options=self.shard_options, shuffle=shuffle,
            num_epochs=num_epochs, seed=seed if shuffle else None)
        if worker_count:  # grain's worker processes read absl flags (parsed under absl.app)
            from absl import flags
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
        bucketed = bool(dict(spec.vision).get("buckets"))  # image buckets: one pixels shape each
        batch = (BucketBatch if bucketed else grain.Batch)(batch_size, drop_remainder=drop_remainder)
        ops = [Encode(tokenizer, spec, self.stats), DropSkipped(), batch]
        self.loader = grain.DataLoader(data_source=SafeSource(source), sampler=self.sampler,
                                       operations=ops, worker_count=worker_count,
                                       shard_options=self.shard_options)

    def __iter__(self):
        return iter(self.loader)


def make_loader(source, tokenizer, spec: TextImageSpec, *, global_batch_size: int,
                seed: int = 0, shuffle: bool = True, num_epochs: Optional[int] = None,
                shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                worker_count: int = 0) -> Loader:
    """Training loader: this process's share (`global_batch_size / shard_count` per batch) of a
    seeded shuffle, repeated forever unless `num_epochs`, sharded by `jax.process_index()` /
    `jax.process_count()` unless given. Full batches only."""
    if shard_count is None:
        import jax
        shard_count = jax.process_count()
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                         f"{shard_count} processes (shards)")
    return Loader(source, tokenizer, spec, batch_size=global_batch_size // shard_count,
                  seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
                  shard_count=shard_count, worker_count=worker_count)


def eval_batches(source, tokenizer, spec: TextImageSpec, *, batch_size: int,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                 stats: Optional[Stats] = None) -> Iterator[dict]:
    """One pass in order over this process's shard (every record exactly once over all
    shards), in full batches of `batch_size`: the last one is padded with rows whose
    `example_valid` is False (and loss_mask / query_valid all False)."""
    ld = Loader(source, tokenizer, spec, batch_size=batch_size, shuffle=False, num_epochs=1,
                shard_index=shard_index, shard_count=shard_count, drop_remainder=False,
                stats=stats)
    for batch in ld:
        yield pad_batch(batch, batch_size)


def pad_batch(batch: dict, batch_size: int) -> dict:
    n = len(batch["example_valid"])
    if n == batch_size:
        return batch
    out = {}
    for k, v in batch.items():
        pad = np.zeros((batch_size - n,) + v.shape[1:], v.dtype)
        if k == "labels":
            pad[:] = IGNORE
        elif k in ("label_round", "round_type"):
            pad[:] = -1
        out[k] = np.concatenate([v, pad])
    return out
