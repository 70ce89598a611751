"""Data: the shapes_vqa builder, llava_json, tokenizers, preprocessing and the grain pipeline."""

import io
import json
import os
import re

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from hidrop_jax.data import image as image_lib  # noqa: E402
from hidrop_jax.data import pipeline as P  # noqa: E402
from hidrop_jax.data import shapes  # noqa: E402
from hidrop_jax.data.sources import load_source, make_builder, prepare  # noqa: E402
from hidrop_jax.data.tokenizer import (build_word_tokenizer, load_tokenizer,  # noqa: E402
                                       shapes_vqa_tokenizer)

SMALL = "shapes_vqa:train=40,validation=10,test=10,text_only_frac=0.1"
N_VISION = 576


def _s(x):
    return x.decode() if isinstance(x, bytes) else str(x)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    prepare(make_builder(SMALL, d))
    return d


@pytest.fixture(scope="module")
def train(data_dir):
    return load_source(SMALL, "train", data_dir)


@pytest.fixture(scope="module")
def decoded(data_dir):
    return load_source(SMALL, "train", data_dir, decode_images=True)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    shapes_vqa_tokenizer(d)
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small subword (BPE, sentencepiece-like Metaspace) tokenizer: answers span several
    tokens and token boundaries do not follow words, as with a real LLaMA tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    from hidrop_jax.data.templates import V1_SYSTEM
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    text = [V1_SYSTEM, "USER: ASSISTANT:", "\n"] + shapes.vocabulary_texts()
    t.train_from_iterator(text * 3, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>")
    d = str(tmp_path_factory.mktemp("bpe"))
    hf.save_pretrained(d)
    return load_tokenizer(d)


# ----------------------------------------------------------------------------- builder

def test_build_is_deterministic(data_dir, tmp_path):
    prepare(make_builder(SMALL, str(tmp_path)))
    rel = os.path.join("shapes_vqa", "s0_40_10_10_t100", "1.0.0")
    files = sorted(f for f in os.listdir(os.path.join(data_dir, rel)) if "array_record" in f)
    assert len(files) == 3
    for f in files:  # identical bytes, hence identical records
        a = open(os.path.join(data_dir, rel, f), "rb").read()
        b = open(os.path.join(tmp_path, rel, f), "rb").read()
        assert a == b, f
    # and a different seed gives different data
    other = load_source(SMALL + ",seed=1", "train", str(tmp_path))
    mine = load_source(SMALL, "train", data_dir)
    assert {_s(other[i]["id"]) for i in range(40)} == {_s(mine[i]["id"]) for i in range(40)}
    by_id = {_s(mine[i]["id"]): mine[i]["image"] for i in range(40)}
    assert sum(by_id[_s(other[i]["id"])] != other[i]["image"] for i in range(40)) > 30


def test_splits_and_sizes(data_dir):
    b = make_builder(SMALL, data_dir)
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {
        "train": 40, "validation": 10, "test": 10}
    # named configs keep the sizes
    full = make_builder("shapes_vqa", data_dir).builder_config
    assert (full.num_train, full.num_validation, full.num_test) == (20_000, 1_000, 1_000)


def _parse_and_check(q, a, objs, img):
    kinds, colors = objs["kind"], objs["color"]
    if m := re.fullmatch(r"what color is the (\w+) \?", q):
        (j,) = [i for i, k in enumerate(kinds) if k == m[1]]
        assert colors[j] == a
        assert shapes.nearest_color(img[objs["y"][j], objs["x"][j]]) == a
    elif m := re.fullmatch(r"what shape is the (\w+) object \?", q):
        (j,) = [i for i, c in enumerate(colors) if c == m[1]]
        assert kinds[j] == a
    elif q == "how many shapes are there ?":
        assert a == shapes.NUMBERS[len(kinds)]
    elif m := re.fullmatch(r"how many (\w+) shapes are there \?", q):
        assert a == shapes.NUMBERS[colors.count(m[1])]
    elif m := re.fullmatch(r"how many (\w+) are there \?", q):
        kind = {v: k for k, v in shapes.PLURAL.items()}[m[1]]
        assert a == shapes.NUMBERS[kinds.count(kind)]
    elif m := re.fullmatch(r"is there an? (\w+) (\w+) \?", q):
        assert a == ("yes" if (m[1], m[2]) in set(zip(colors, kinds)) else "no")
    elif m := re.fullmatch(r"where is the (\w+) (\w+) relative to the (\w+) (\w+) \?", q):
        pairs = list(zip(colors, kinds))
        i, j = pairs.index((m[1], m[2])), pairs.index((m[3], m[4]))
        dx, dy = objs["x"][i] - objs["x"][j], objs["y"][i] - objs["y"][j]
        want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
        assert a == want and max(abs(dx), abs(dy)) >= 2 * min(abs(dx), abs(dy))
    else:
        raise AssertionError(f"unexpected question {q!r}")


def test_answers_match_the_images(decoded):
    n_img = 0
    for i in range(len(decoded)):
        ex = decoded[i]
        conv = {k: [_s(x) for x in v] for k, v in ex["conversations"].items()}
        assert 1 <= len(conv["question"]) <= 3
        assert all(len(a.split()) == 1 for a in conv["answer"])  # single-word answers
        if not ex["has_image"]:
            assert set(conv["type"]) == {"text"} and len(ex["objects"]["kind"]) == 0
            continue
        n_img += 1
        img = ex["image"]
        assert img.shape == (336, 336, 3) and img.dtype == np.uint8
        objs = {k: ([_s(x) for x in v] if k in ("kind", "color") else list(v))
                for k, v in ex["objects"].items()}
        assert 1 <= len(objs["kind"]) <= 5
        for x, y, c in zip(objs["x"], objs["y"], objs["color"]):  # centre pixel has the colour
            assert shapes.nearest_color(img[y, x]) == c
        for q, a in zip(conv["question"], conv["answer"]):
            _parse_and_check(q, a, objs, img)
        # most 14×14 patches are background; background patches differ from each other
        bg = np.ones((24, 24), bool)
        for x, y, r in zip(objs["x"], objs["y"], objs["radius"]):
            bg[max(y - r, 0) // 14:(y + r) // 14 + 1, max(x - r, 0) // 14:(x + r) // 14 + 1] = False
        assert bg.mean() > 0.8
        patches = img.reshape(24, 14, 24, 14, 3).transpose(0, 2, 1, 3, 4)[bg].reshape(-1, 14 * 14 * 3)
        assert len(np.unique(patches, axis=0)) == len(patches)
    assert n_img > 30


def test_text_only_fraction(train):
    frac = np.mean([shapes.is_text_only(0, "train", i, 0.03) for i in range(20_000)])
    assert 0.025 < frac < 0.035
    built = {_s(train[i]["id"]): bool(train[i]["has_image"]) for i in range(len(train))}
    for k, has in built.items():
        assert has == (not shapes.is_text_only(0, "train", int(k.split("_")[1]), 0.1))
    assert 0 < sum(not h for h in built.values()) < 40


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(tok, train):
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, 3, 4]
    text = "USER: <image>\nwhat color is the circle ? ASSISTANT: red</s>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "USER : <image> \n what color is the circle ? ASSISTANT : red </s>"
    # the whole dataset's text is in the vocabulary, and rebuilding gives the same ids
    for i in range(len(train)):
        conv = train[i]["conversations"]
        for s in list(conv["question"]) + list(conv["answer"]):
            assert tok.unk_token_id not in tok(_s(s), add_special_tokens=False)["input_ids"], s
    assert shapes_vqa_tokenizer().get_vocab() == tok.get_vocab()
    assert build_word_tokenizer(["b a", "c"], pad_to_multiple_of=8).get_vocab() == {
        "<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<pad>": 4, "a": 5, "b": 6, "c": 7}


# ----------------------------------------------------------------------------- image

def test_preprocessing_matches_llava(tmp_path):
    from transformers.models.clip import CLIPImageProcessorPil
    rng = np.random.default_rng(0)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    mean, std = np.asarray(image_lib.CLIP_MEAN), np.asarray(image_lib.CLIP_STD)
    fill = np.asarray([int(x * 255) for x in image_lib.CLIP_MEAN], np.uint8)
    for h, w in [(50, 80), (90, 40), (336, 336)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        side = max(h, w)  # independent expand2square: numpy canvas of the mean colour
        sq = np.broadcast_to(fill, (side, side, 3)).copy()
        sq[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
        want = proc(images=sq, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        buf = io.BytesIO()
        from PIL import Image
        Image.fromarray(img).save(buf, format="PNG")
        got = image_lib.preprocess(buf.getvalue(), 336)
        assert got.shape == (336, 336, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        if h == w:  # no resize: plain arithmetic
            np.testing.assert_allclose(got, (img / 255.0 - mean) / std, atol=1e-5)


# ----------------------------------------------------------------------------- encoding

def _check_example(ex, tokenizer, spec, questions, answers, has_image):
    T, n = spec.max_len, int(ex["text_valid"].sum())
    assert ex["text_valid"][:n].all() and not ex["text_valid"][n:].any()
    pos, slot = ex["text_pos"], int(ex["image_slot"])
    assert (np.diff(pos) > 0).all()                          # strictly increasing
    if has_image:
        steps = np.diff(pos[:n])
        assert steps[slot - 1] == N_VISION + 1 and (np.delete(steps, slot - 1) == 1).all()
        assert (pos[:slot] == np.arange(slot)).all()
    else:
        assert (pos == np.arange(T)).all() and slot == 0
    ids, labels, mask = ex["text_ids"], ex["labels"], ex["loss_mask"]
    assert (mask == (labels != P.IGNORE)).all() and not ex["truncated"]
    # labels are the next text token, at answer tokens only, and decode to exactly the answers
    rows = np.flatnonzero(mask)
    assert (labels[rows] == ids[rows + 1]).all()
    if has_image:
        assert slot - 1 not in rows
    n_rounds = 1 if spec.template == "plain" else len(answers)
    sep = "\n" if spec.template == "plain" else "</s>"
    for r in range(n_rounds):
        got = tokenizer.decode(labels[ex["label_round"] == r]).replace(" ", "").replace("▁", "")
        assert got == (answers[r] + sep).replace(" ", ""), (got, answers[r])
        q = ex["query_idx"][r]  # query row: the last token before the answer
        assert ex["query_valid"][r] and ex["label_round"][q] == r
        assert q == 0 or ex["label_round"][q - 1] != r
        assert ex["answer_text"][r] == answers[r]
    assert not ex["query_valid"][n_rounds:].any()
    # what the model reads: the prompt, without the answers being visible before their rows
    text = tokenizer.decode(ids[:n]).replace(" ", "").replace("▁", "")
    for qq in (questions if spec.template != "plain" else questions[:0]):
        assert qq.replace(" ", "") in text


@pytest.mark.parametrize("template", ["v1", "v1_nosys", "plain"])
@pytest.mark.parametrize("which", ["word", "bpe"])
def test_labels_positions_queries(template, which, train, tok, bpe):
    tokenizer = tok if which == "word" else bpe
    spec = P.TextImageSpec(template=template, max_len=256, num_queries=4, n_vision=N_VISION,
                           image_size=56)
    seen = set()
    for i in range(len(train)):
        rec = train[i]
        c = rec["conversations"]
        qs, ans = [_s(x) for x in c["question"]], [_s(x) for x in c["answer"]]
        ex = P.encode_example(rec, tokenizer, spec)
        assert ex["pixels"].shape == (56, 56, 3) and ex["pixels"].dtype == np.float32
        _check_example(ex, tokenizer, spec, qs, ans, bool(rec["has_image"]))
        seen.add((bool(rec["has_image"]), len(qs)))
    assert {(True, 1), (True, 3)} <= seen and any(not has for has, _ in seen)


def test_llava_v1_text():
    """The v1 string is LLaVA's conv_vicuna_v1 prompt."""
    from hidrop_jax.data.templates import V1_SYSTEM, render
    r = render("v1", ["q1", "q2"], ["a1", "a2"], True)
    full = r.before + "<image>" + r.after
    assert full == (V1_SYSTEM + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>")
    assert [r.after[a:b] for a, b in r.spans] == ["a1</s>", "a2</s>"]
    r = render("v1_nosys", ["q1", "q2"], ["a1", "a2"], True)
    assert r.before + "<image>" + r.after == "USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    r = render("v1_nosys", ["q1"], ["a1"], False)
    assert (r.before, r.after, r.spans) == ("", "USER: q1 ASSISTANT: a1</s>", [(20, 26)])
    r = render("plain", ["q1"], ["a caption"], True)
    assert (r.before, r.after, r.spans) == ("", "\na caption\n", [(1, 11)])


def test_matches_hf_adapter(train, tok):
    """Our native inputs equal what the model's HF adapter derives from the expanded sequence."""
    import jax
    from hidrop_jax.config import make_config, model_config
    from hidrop_jax.batch import to_inputs
    from hidrop_jax.hf.inputs import hf_to_inputs
    from hidrop_jax.model import forward, init_params
    m = model_config(vision=dict(image_size=56, patch_size=14, hidden_size=16,
                                 intermediate_size=32, num_layers=1, num_heads=2),
                     text=dict(vocab_size=128, hidden_size=16, intermediate_size=32,
                               num_layers=4, num_heads=2), image_token_id=3)
    spec = P.TextImageSpec.for_model(m, max_len=96)
    assert spec.n_vision == 16
    exs = [P.encode_example(train[i], tok, spec) for i in range(6)]
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    L = 96 + 16
    ids = np.full((6, L), tok.pad_token_id)
    mask = np.zeros((6, L), bool)
    for b, e in enumerate(exs):
        n, s = int(e["text_valid"].sum()), int(e["image_slot"])
        seq = list(e["text_ids"][:n])
        if e["has_image"]:
            seq = seq[:s] + [3] * 16 + seq[s:]
        ids[b, :len(seq)], mask[b, :len(seq)] = seq, True
    want, _ = hf_to_inputs(m, ids, batch["pixels"], mask)
    inputs, targets = to_inputs(batch)
    for k in ("text_ids", "text_pos", "text_valid", "image_slot", "has_image"):
        a, b = np.asarray(getattr(want, k)), np.asarray(getattr(inputs, k))
        v = batch["text_valid"] if a.ndim == 2 else np.ones(len(a), bool)
        if k == "image_slot":
            v = batch["has_image"]
        assert (a[v] == b[v]).all(), k
    # and the model runs on it with a pruning schedule that uses the query rows
    cfg = make_config(m, "")
    cfg.hidrop.update(dict(inject_layer=1, prune_after=(1,), keep=(4,), exit_layer=3))
    logits = jax.jit(lambda p, x: forward(cfg, p, x))(init_params(cfg, jax.random.PRNGKey(0)), inputs)
    assert logits.shape == (6, 96, 128) and np.isfinite(np.asarray(logits)).all()
    assert targets.labels.shape == (6, 96) and targets.loss_mask.dtype == bool


# ----------------------------------------------------------------------------- loader

def _loader(src, tok, **kw):
    spec = P.TextImageSpec(max_len=96, n_vision=N_VISION, image_size=28)
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return P.make_loader(src, tok, spec, **kw)


def test_iterator_state_resumes(train, tok):
    it = iter(_loader(train, tok, global_batch_size=4, seed=3))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it)["id"] for _ in range(12)]  # crosses an epoch boundary (40 records)
    it2 = iter(_loader(train, tok, global_batch_size=4, seed=3))
    it2.set_state(state)
    assert [next(it2)["id"].tolist() for _ in range(12)] == [w.tolist() for w in want]
    epoch1 = np.concatenate(want[:7]).tolist()   # batches 3..9 of epoch 1, then epoch 2
    epoch2 = np.concatenate(want[7:]).tolist()
    assert len(set(epoch1)) == 28 and len(set(epoch2)) == 20


def test_sharding_gives_disjoint_covers(train, tok):
    got = []
    for i in range(2):
        ld = _loader(train, tok, global_batch_size=4, seed=0, num_epochs=1,
                     shard_index=i, shard_count=2)
        got.append([x for b in ld for x in b["id"].tolist()])
        assert all(len(b["id"]) == 2 for b in ld)  # per-process batch = global / processes
    assert not set(got[0]) & set(got[1])
    assert set(got[0]) | set(got[1]) == {_s(train[i]["id"]) for i in range(len(train))}
    with pytest.raises(ValueError, match="divisible"):
        _loader(train, tok, global_batch_size=5, shard_index=0, shard_count=2)


def test_truncation_counted(train, tok):
    spec = P.TextImageSpec(max_len=60, n_vision=N_VISION, image_size=28)
    full = P.TextImageSpec(max_len=512, n_vision=N_VISION, image_size=28)
    lengths = [int(P.encode_example(train[i], tok, full)["text_valid"].sum()) for i in range(40)]
    want = sum(n > 60 for n in lengths)
    assert 0 < want < 40
    ld = P.make_loader(train, tok, spec, global_batch_size=8, num_epochs=1, shuffle=False,
                       shard_index=0, shard_count=1)
    batches = list(ld)
    assert ld.stats.counts["truncated"] == want == sum(int(b["truncated"].sum()) for b in batches)
    for b in batches:  # a truncated example still has static shape and labels only in range
        assert b["text_ids"].shape == (8, 60)
        assert (b["query_idx"][b["query_valid"]] < 60).all()


class _Corrupting:
    """A data source with unreadable records and records whose image bytes are garbage."""

    def __init__(self, src, raise_at, garbage_at):
        self.src, self.raise_at, self.garbage_at = src, raise_at, garbage_at

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        if i in self.raise_at:
            raise OSError(f"checksum mismatch in record {i}")
        rec = dict(self.src[i])
        if i in self.garbage_at:
            rec["image"], rec["has_image"] = b"\xff\xd8\xff\xe0 not a jpeg", True
        return rec


def test_corrupt_records_skipped_and_counted(train, tok):
    src = _Corrupting(train, raise_at={3, 17}, garbage_at={5, 6, 30})
    ld = _loader(src, tok, global_batch_size=5, num_epochs=1, shuffle=False)
    batches = list(ld)
    assert ld.stats.counts["skipped"] == 5 and ld.stats.counts["examples"] == 35
    assert sum(int(b["skipped_before"].sum()) for b in batches) == 5
    assert sum(len(b["id"]) for b in batches) == 35 and len(ld.stats.errors) == 5
    # eval: one pass, last batch padded with invalid rows
    stats = P.Stats()
    ev = list(P.eval_batches(src, tok, _loader(train, tok, global_batch_size=1).spec,
                             batch_size=8, shard_index=0, shard_count=1, stats=stats))
    assert [len(b["id"]) for b in ev] == [8] * 5
    assert sum(int(b["example_valid"].sum()) for b in ev) == 35 and stats.counts["skipped"] == 5
    assert not ev[-1]["loss_mask"][~ev[-1]["example_valid"]].any()


# ----------------------------------------------------------------------------- llava_json

def test_llava_json_fixture(tmp_path, tok):
    from PIL import Image
    m = tmp_path / "manual"
    (m / "imgs").mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), (200, 10, 10), np.uint8)).save(m / "imgs/a.jpg")
    Image.fromarray(np.full((50, 30, 3), (10, 200, 10), np.uint8)).save(m / "imgs/b.png")
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(m / "imgs/gray.png")
    (m / "imgs/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    H, G = "human", "gpt"
    recs = [
        {"id": "a", "image": "imgs/a.jpg", "conversations": [
            {"from": H, "value": "<image>\nwhat color is the square ?"}, {"from": G, "value": "red"}]},
        {"id": "b", "image": "imgs/b.png", "conversations": [
            {"from": H, "value": "what shape is the green object ?\n<image>"}, {"from": G, "value": "square"},
            {"from": H, "value": "is there a green square ?"}, {"from": G, "value": "yes"}]},
        {"id": "t", "conversations": [
            {"from": H, "value": "what is the opposite of left ?"}, {"from": G, "value": "right"}]},
        {"id": "missing", "image": "imgs/nope.jpg", "conversations": [
            {"from": H, "value": "<image>\nq"}, {"from": G, "value": "a"}]},
        {"id": "corrupt", "image": "imgs/bad.jpg", "conversations": [
            {"from": H, "value": "<image>\nq"}, {"from": G, "value": "a"}]},
        {"id": "gray", "image": "imgs/gray.png", "conversations": [
            {"from": H, "value": "<image>\nhow many shapes are there ?"}, {"from": G, "value": "one"}]},
        {"id": "malformed", "conversations": [{"from": G, "value": "a"}]},
    ]
    (m / "data.json").write_text(json.dumps(recs))
    spec = "llava_json:json_file=data.json,num_validation=2"  # the last two records
    d = str(tmp_path / "tfds")
    train = load_source(spec, "train", d, manual_dir=str(m))
    val = load_source(spec, "validation", d, manual_dir=str(m))
    recs_out = {_s(train[i]["id"]): train[i] for i in range(len(train))}
    assert set(recs_out) == {"a", "b", "t"} and [_s(val[i]["id"]) for i in range(len(val))] == ["gray"]
    recs_out["gray"] = val[0]
    b = make_builder(spec, d)
    assert b.info.metadata["skipped"] == {"missing_image": 1, "corrupt_image": 1, "malformed": 1,
                                          "unsafe_path": 0, "image_tags": 0}
    assert {k: v for k, v in b.info.metadata["skipped_ids"].items() if v} == {
        "missing_image": ["missing"], "corrupt_image": ["corrupt"], "malformed": ["malformed"]}
    rb = recs_out["b"]
    assert [_s(q) for q in rb["conversations"]["question"]] == ["what shape is the green object ?",
                                                              "is there a green square ?"]
    assert rb["has_image"] and not recs_out["t"]["has_image"]
    # through the pipeline: the non-square images are padded to square with the mean colour
    spec_ = P.TextImageSpec(max_len=96, n_vision=N_VISION, image_size=28)
    ex = P.encode_example(recs_out["a"], tok, spec_)
    mean_px = (np.asarray([int(x * 255) for x in image_lib.CLIP_MEAN]) / 255 - np.asarray(
        image_lib.CLIP_MEAN)) / np.asarray(image_lib.CLIP_STD)
    np.testing.assert_allclose(ex["pixels"][0, 14], mean_px, atol=1e-6)   # top band: padding
    assert ex["pixels"][14, 14, 0] > 1.0                                   # centre: red
    assert P.encode_example(recs_out["gray"], tok, spec_)["pixels"].shape == (28, 28, 3)
    for r in recs_out.values():
        c = r["conversations"]
        _check_example(P.encode_example(r, tok, spec_), tok, spec_,
                       [_s(x) for x in c["question"]], [_s(x) for x in c["answer"]],
                       bool(r["has_image"]))
