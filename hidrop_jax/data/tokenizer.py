"""Tokenizers: a word-level one for `shapes_vqa` (built offline, deterministic) and local
directories for real models. Both come back as `transformers.PreTrainedTokenizerFast`, with
offsets, which the pipeline uses to put labels on answer tokens exactly.

Word-level vocabulary: the family's special tokens first with fixed ids (`Family.special_tokens`;
LLaVA's `<image>` = 3 as in `configs/tiny_shapes.py`), then the words in sorted order. Words are
runs of letters/digits, single punctuation marks and newlines (a newline is a token: the `plain`
template's separator).
"""

from __future__ import annotations

import os
import re

from hidrop_jax.data import shapes
from hidrop_jax.families import FAMILIES

_WORD_RE = r"\w+|[^\w\s]|\n"


def split_words(text: str) -> list[str]:
    """The word-level tokenizer's pre-tokenization, in Python (for vocabulary building)."""
    return re.findall(_WORD_RE, text)


def build_word_tokenizer(texts, out_dir: str | None = None, *, min_count: int = 1,
                         pad_to_multiple_of: int = 1, family: str = "llava"):
    """A word-level `PreTrainedTokenizerFast` over the words of `texts` (any iterable of str).

    Deterministic: ids depend only on the set of words. `pad_to_multiple_of` adds `<extra_i>`
    tokens so the vocabulary size is a multiple of it. Saved to `out_dir` if given. `family`:
    whose special tokens and roles (`Family.special_tokens`, `token_roles`; first: unk).
    """
    fam = FAMILIES[family]
    special = fam.special_tokens
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts: dict[str, int] = {}
    for t in texts:
        for w in split_words(t):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= min_count and w not in special)
    vocab = {tok: i for i, tok in enumerate(special)}
    for w in words:
        vocab[w] = len(vocab)
    i = 0
    while len(vocab) % pad_to_multiple_of:
        vocab[f"<extra_{i}>"] = len(vocab)
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special[0]))
    # Drop runs of non-newline whitespace, then isolate words, punctuation marks and newlines.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_WORD_RE), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="\u0000", cleanup=False)  # join with spaces
    roles = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in fam.token_roles.items()}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=special[0], padding_side="right", **roles)
    if out_dir is not None:
        hf.save_pretrained(out_dir)
    return hf


def template_texts(family: str = "llava") -> list[str]:
    """Every fixed string the chat templates emit (so the word-level vocabulary covers them)."""
    return list(FAMILIES[family].template_strings)


def shapes_vqa_tokenizer(out_dir: str | None = None, *, pad_to_multiple_of: int = 1,
                         family: str = "llava"):
    """The `shapes_vqa` tokenizer: the generator's whole vocabulary + the templates' words
    (`family`: whose special tokens and template words, e.g. "qwen2_5_vl": the `qwen2` template's).

    Built from the generator's vocabulary rather than from a particular build, so small and
    full builds share one tokenizer; `tests/test_data.py` checks a build tokenizes with no
    `<unk>`. Use `build_word_tokenizer(texts_of(source))` for a vocabulary read from data.
    """
    return build_word_tokenizer(shapes.vocabulary_texts() + template_texts(family), out_dir,
                                pad_to_multiple_of=pad_to_multiple_of, family=family)


def texts_of(source):
    """All questions and answers of a TFDS data source (for a vocabulary read from data)."""
    for i in range(len(source)):
        conv = source[i]["conversations"]
        for k in ("question", "answer"):
            for t in conv[k]:
                yield t.decode() if isinstance(t, bytes) else t


def load_tokenizer(path: str):
    """A local tokenizer directory (a saved word-level one, or a real model's, e.g. Vicuna's),
    offline. Gives it a pad token if it has none (LLaVA v1 uses `<unk>` as pad)."""
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is needed for offsets")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok
