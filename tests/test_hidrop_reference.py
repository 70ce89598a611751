"""HiDrop against a slow, straightforward reference written from the method's definition.

The reference (PyTorch, Hugging Face modules, independent of hidrop_jax) runs ONE sample at a
time over a plain Python list of tokens (hidden state, position, kind, original vision index),
and physically removes tokens at each cut:

- persistent positions: 0..len-1 over the sample's valid tokens with the image's slots reserved
  (text after the image is shifted by n_vision even in text-only layers);
- layers [0, inject) see text only; vision features join at inject at their reserved positions;
- attention: a query sees the present keys whose position <= its own;
- after layer p in prune_after: score each present vision token with layer p+1's input norm,
  q/k projections and RoPE (fp32 softmax, 1/sqrt(head_dim), causal by position, GQA), average
  over heads, vision columns, average over the query rows; keep the k best in original order;
- at exit_layer all vision tokens leave; logits = norm + lm_head on the text tokens.

Position variants: 'compacted' (PyramidDrop: vision renumbered contiguously from the image slot,
text after the image shifted back by n_vision - present) and 'group' (text persistent, vision
renumbered contiguously from the slot). At a cut the scores use the positions of the stage that
just ran (the tokens' positions before the cut).

The JAX side is compared to <= 1e-5 in float32 logits at every valid text position, and its
kept vision indices per cut to the reference's kept sets.
"""

import copy
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_tiny import IMAGE_TOKEN, hf_logits, make_hf_llava
from hidrop_jax.convert import load_hf
from hidrop_jax.hf.inputs import hf_to_inputs
from hidrop_jax.model import forward, forward_hf

pytestmark = pytest.mark.slow

TOL = 1e-5
N_LAYERS = 8
VISION = dict(image_size=56, patch_size=14, num_hidden_layers=2)  # 16 vision tokens
MODELS = {
    "mha": dict(num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2),
}
SCHEDULES = {  # (inject_layer, prune_after, keep, exit_layer)
    "hidrop": (2, (2, 4), (8, 3), 6),
    "pdrop": (0, (1, 3, 5), (12, 6, 2), None),
    "one_cut_exit": (1, (3,), (5,), 5),
    "vanilla": (0, (), (), None),
}
# A batch: per sample (text length, index of the image in the text or None); padding side.
BATCHES = {
    "ragged_right": ([(9, 2), (6, 0), (12, 5)], "right"),
    "ragged_left": ([(9, 2), (6, 0), (12, 5)], "left"),
    "mixed_right": ([(7, 3), (6, None), (4, 1)], "right"),
    "mixed_left": ([(5, 2), (7, None), (8, 6)], "left"),
    "text_only": ([(7, None), (4, None), (10, None)], "right"),
}
LENGTH = 30  # every batch is [3, 30] (14 text slots with an image) and ...
QMAX = 4     # ... every query_idx [3, 4]: the cases of one config share one compiled program


# ----------------------------------------------------------------------------- models, batches

@functools.lru_cache(maxsize=None)
def _pair(name, tmp_root):
    d = f"{tmp_root}/{name}"
    hf = make_hf_llava(d, vision=VISION, text=MODELS[name], seed=3)
    hf.set_attn_implementation("eager")
    cfg, params = load_hf(d)
    return hf, cfg, params


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hidrop_ref"))


def build_batch(n_vision, samples, padding, seed=0, length=LENGTH):
    """HF-style (input_ids, attention_mask, NCHW pixels of the samples with an image), padded to
    `length` so that cases share compiled programs."""
    rng = np.random.default_rng(seed)
    rows = []
    for length, at in samples:
        toks = [int(t) for t in rng.integers(3, IMAGE_TOKEN - 1, size=length)]
        if at is not None:
            toks = toks[:at] + [IMAGE_TOKEN] * n_vision + toks[at:]
        rows.append(toks)
    L = max(length, max(map(len, rows)))
    ids = np.zeros((len(rows), L), np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    n_img = sum(at is not None for _, at in samples)
    size = VISION["image_size"]
    pixels = rng.normal(size=(n_img, 3, size, size)).astype(np.float32)
    return ids, mask, pixels


# ----------------------------------------------------------------------------- the reference

@dataclass
class Tok:
    h: torch.Tensor      # [D]
    full_pos: int        # persistent position in the full sequence (image slots reserved)
    kind: str            # "text" | "vision"
    vidx: int = -1       # original vision index
    col: int = -1        # column in input_ids (text)


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-b, a], dim=-1)


def _positions(toks, mode, slot, n_vision, has_image):
    """Current RoPE position of every token in `toks` under a position mode."""
    vis = [t for t in toks if t.kind == "vision"]
    rank = {t.vidx: r for r, t in enumerate(sorted(vis, key=lambda t: t.vidx))}
    out = []
    for t in toks:
        if mode == "persistent" or not has_image:
            out.append(t.full_pos)
        elif t.kind == "vision":
            out.append(slot + rank[t.vidx])
        elif mode == "compacted" and t.full_pos > slot:
            out.append(t.full_pos - (n_vision - len(vis)))
        else:
            out.append(t.full_pos)
    return out


def _causal_mask(pos):
    p = torch.tensor(pos)
    allowed = p[None, :] <= p[:, None]  # [query, key]
    m = torch.zeros(allowed.shape, dtype=torch.float32)
    m[~allowed] = torch.finfo(torch.float32).min
    return m[None, None]


def _score(layer, lm, hs, pos, toks, query_cols, cfg):
    """One score per present vision token (in list order of `toks`), from layer `layer`."""
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    attn = layer.self_attn
    x = layer.input_layernorm(hs)                                  # [1, S, D]
    S = x.shape[1]
    q = attn.q_proj(x).view(S, nh, hd).transpose(0, 1)             # [nh, S, hd]
    k = attn.k_proj(x).view(S, nkv, hd).transpose(0, 1)            # [nkv, S, hd]
    cos, sin = lm.rotary_emb(x, torch.tensor([pos]))               # [1, S, hd]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    rows = [i for i, t in enumerate(toks) if t.kind == "text" and t.col in query_cols]
    assert len(rows) == len(set(query_cols)), "a query row is not a present text token"
    probs = []
    for h in range(nh):
        kh = k[h // (nh // nkv)]                                   # this head's kv group
        logits = (q[h, rows] @ kh.T).float() * hd ** -0.5          # [Q, S]
        p = torch.tensor(pos)
        allowed = p[None, :] <= p[rows][:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs.append(torch.softmax(logits, dim=-1, dtype=torch.float32))
    probs = torch.stack(probs).mean(0)                             # [Q, S]
    vis_cols = [i for i, t in enumerate(toks) if t.kind == "vision"]
    return probs[:, vis_cols].mean(0)                              # [n present vision]


@torch.no_grad()
def reference_sample(model, ids, mask, pixel, sched, mode="persistent", query_cols=None):
    """Logits {input_ids column: [V]} for the valid text tokens of one sample, and the kept
    original vision indices per cut (None per cut for a sample without an image)."""
    inject, prune_after, keep, exit_layer = sched
    cfg = model.config
    tcfg = cfg.text_config
    lm = model.model.language_model
    L = tcfg.num_hidden_layers
    exit_layer = L if exit_layer is None else exit_layer
    n_v = cfg.image_seq_length

    text, vision = [], []
    full = 0
    for j in range(len(ids)):
        if not mask[j]:
            continue
        if ids[j] == IMAGE_TOKEN:
            vision.append(Tok(None, full, "vision", vidx=len(vision)))
        else:
            emb = lm.embed_tokens(torch.tensor([int(ids[j])]))[0]
            text.append(Tok(emb, full, "text", col=j))
        full += 1
    has_image = bool(vision)
    assert len(vision) in (0, n_v)
    slot = vision[0].full_pos if has_image else 0
    if has_image:
        feats = model.model.get_image_features(
            pixel_values=torch.tensor(pixel)[None],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output[0]
        assert feats.shape[0] == n_v
        for t, f in zip(vision, feats):
            t.h = f
    if query_cols is None:  # inference: the last prompt token
        query_cols = [max(text, key=lambda t: t.full_pos).col]

    toks = list(text)  # layers [0, inject): text only
    kept = []
    for layer_i in range(L):
        if has_image and layer_i == inject:
            toks = toks + vision
        if layer_i == exit_layer:
            toks = [t for t in toks if t.kind == "text"]
        pos = _positions(toks, mode, slot, n_v, has_image)
        cos, sin = lm.rotary_emb(toks[0].h[None, None], torch.tensor([pos]))
        hs = torch.stack([t.h for t in toks])[None]
        hs = lm.layers[layer_i](hs, attention_mask=_causal_mask(pos),
                                position_embeddings=(cos, sin))
        hs = hs[0] if isinstance(hs, tuple) else hs
        for t, h in zip(toks, hs[0]):
            t.h = h
        if layer_i in prune_after:
            k = keep[prune_after.index(layer_i)]
            if not has_image:
                kept.append(None)
                continue
            scores = _score(lm.layers[layer_i + 1], lm, hs, pos, toks, query_cols, tcfg)
            vis = [t for t in toks if t.kind == "vision"]
            top = set(torch.topk(scores, k).indices.tolist())
            survivors = [t for i, t in enumerate(vis) if i in top]
            kept.append(sorted(t.vidx for t in survivors))
            toks = [t for t in toks if t.kind == "text"] + sorted(survivors, key=lambda t: t.vidx)
    text_h = torch.stack([t.h for t in toks if t.kind == "text"])
    logits = model.lm_head(lm.norm(text_h[None]))[0]
    cols = [t.col for t in toks if t.kind == "text"]
    return dict(zip(cols, logits.float().numpy())), kept


def reference_batch(model, ids, mask, pixels, sched, mode="persistent", query_cols=None):
    out, kept, img = [], [], 0
    for i in range(len(ids)):
        has = bool((ids[i][mask[i].astype(bool)] == IMAGE_TOKEN).any())
        px = pixels[img] if has else None
        img += has
        q = None if query_cols is None else query_cols[i]
        logits, k = reference_sample(model, ids[i], mask[i], px, sched, mode, q)
        out.append(logits)
        kept.append(k)
    return out, kept


# ----------------------------------------------------------------------------- the JAX side

def _cfg(cfg, sched, mode):
    cfg = copy.deepcopy(cfg)
    inject, prune_after, keep, exit_layer = sched
    h = cfg.hidrop
    h.inject_layer, h.prune_after, h.keep = inject, tuple(prune_after), tuple(keep)
    h.exit_layer = exit_layer
    h.selection = "hard"
    h.positions = mode
    return cfg


_COMPILED = {}


def _native_forward(cfg, params, inputs):
    """`forward(..., return_aux=True)` jitted, compiled once per config and input shapes. XLA's
    backend optimisation is off: it halves compile time, and these programs are tiny."""
    key = (cfg.to_json(), str(jax.tree.map(lambda a: (a.shape, a.dtype), inputs)))
    if key not in _COMPILED:
        fn = jax.jit(lambda p, x: forward(cfg, p, x, return_aux=True))
        _COMPILED[key] = fn.lower(params, inputs).compile(
            compiler_options={"xla_backend_optimization_level": 0})
    return _COMPILED[key](params, inputs)


def _training_queries(ids, mask, seed=0):
    """Per sample 2–3 text columns of input_ids used as query rows: random earlier text tokens
    (some before the image: they see no vision token) and the last one (it sees the image)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(ids)):
        cols = [j for j in range(ids.shape[1]) if mask[i, j] and ids[i, j] != IMAGE_TOKEN]
        n = min(len(cols), 2 + i % 2)
        pick = sorted(rng.choice(len(cols) - 1, size=n - 1, replace=False).tolist()) + [len(cols) - 1]
        out.append([cols[p] for p in pick])
    return out


def _compare_logits(ref, out, slots, ids, mask):
    worst = 0.0
    for i, ref_i in enumerate(ref):
        row_of = {}
        for r, c in enumerate(slots[i]):
            if mask[i, c] and ids[i, c] != IMAGE_TOKEN:
                assert c not in row_of, f"sample {i}: column {c} appears twice in the text stream"
                row_of[int(c)] = r
        assert set(row_of) == set(ref_i), f"sample {i}: text stream columns differ from reference"
        for c, lg in ref_i.items():
            worst = max(worst, float(np.abs(out[i, row_of[c]] - lg).max()))
    return worst


def _query_rows(slots, ids, mask, cols_per_sample):
    """[B, QMAX] text-stream rows for the given input_ids columns, padded with invalid slots
    whose row index is garbage (the last row), and the validity mask."""
    q_idx = np.full((len(ids), QMAX), slots.shape[1] - 1, np.int32)
    q_val = np.zeros((len(ids), QMAX), bool)
    for i, cols in enumerate(cols_per_sample):
        assert len(cols) < QMAX
        row_of = {int(c): r for r, c in enumerate(slots[i])}
        q_idx[i, :len(cols)] = [row_of[c] for c in cols]
        q_val[i, :len(cols)] = True
    return jnp.asarray(q_idx), jnp.asarray(q_val)


CASES = [  # (model, schedule, batch, query mode, positions)
    ("gqa", "hidrop", "ragged_right", "inference", "persistent"),
    ("gqa", "hidrop", "ragged_left", "inference", "persistent"),
    ("gqa", "hidrop", "mixed_right", "inference", "persistent"),
    ("gqa", "hidrop", "ragged_right", "training", "persistent"),
    ("gqa", "hidrop", "mixed_left", "training", "persistent"),
    ("gqa", "hidrop", "text_only", "inference", "persistent"),
    ("mha", "pdrop", "ragged_right", "inference", "persistent"),
    ("mha", "pdrop", "mixed_left", "training", "persistent"),
    ("gqa", "one_cut_exit", "ragged_left", "inference", "persistent"),
    ("gqa", "one_cut_exit", "mixed_right", "training", "persistent"),
    ("gqa", "vanilla", "mixed_left", "inference", "persistent"),
    ("gqa", "hidrop", "ragged_right", "inference", "compacted"),
    ("gqa", "hidrop", "mixed_left", "training", "compacted"),
    ("gqa", "hidrop", "ragged_left", "inference", "group"),
    ("gqa", "hidrop", "mixed_right", "training", "group"),
]


@pytest.mark.parametrize("model_name,sched_name,batch_name,query_mode,mode", CASES,
                         ids=["-".join(c) for c in CASES])
def test_matches_reference(tmp_root, model_name, sched_name, batch_name, query_mode, mode):
    hf, cfg0, params = _pair(model_name, tmp_root)
    sched = SCHEDULES[sched_name]
    samples, padding = BATCHES[batch_name]
    assert hf.config.image_seq_length == 16
    ids, mask, pixels = build_batch(16, samples, padding, seed=len(batch_name))
    cfg = _cfg(cfg0, sched, mode)
    px = pixels if len(pixels) else None

    queries = _training_queries(ids, mask) if query_mode == "training" else None
    ref, ref_kept = reference_batch(hf, ids, mask, pixels, sched, mode, queries)
    inputs, slots = hf_to_inputs(cfg.model, ids, px, mask)
    if query_mode == "training":  # padded to QMAX with invalid slots pointing at a garbage row
        q_idx, q_val = _query_rows(slots, ids, mask, queries)

    worst = 0.0
    if query_mode == "inference" and (model_name, sched_name, mode) == ("gqa", "hidrop", "persistent"):
        # the public HF-style entry point (its own query row; one full compile per shape)
        out_hf = np.asarray(forward_hf(cfg, params, ids, px, mask))
        worst = _compare_logits(ref, out_hf, slots, ids, mask)
    if query_mode == "training":
        inputs = inputs._replace(query_idx=q_idx, query_valid=q_val)
    logits, aux = _native_forward(cfg, params, inputs)
    worst = max(worst, _compare_logits(ref, np.asarray(logits), slots, ids, mask))
    if px is not None:
        assert len(aux["kept"]) == len(sched[1])
    for i, kept_i in enumerate(ref_kept):  # kept vision sets per cut (samples with an image)
        for c, ref_set in enumerate(kept_i):
            if ref_set is not None:
                got = sorted(np.asarray(aux["kept"][c][i]).tolist())
                assert got == ref_set, f"sample {i}, cut {c}: kept {got}, reference {ref_set}"
    assert worst <= TOL, f"max |Δlogit| = {worst:.3g}"


@pytest.mark.parametrize("batch_name", ["ragged_left", "mixed_right"])
def test_reference_vanilla_is_hf(tmp_root, batch_name):
    """Self-check of the reference: with no HiDrop it is Hugging Face's own LLaVA forward."""
    hf, _, _ = _pair("gqa", tmp_root)
    samples, padding = BATCHES[batch_name]
    ids, mask, pixels = build_batch(16, samples, padding, seed=7)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    full = hf_logits(hf, ids, mask, pos, pixels)
    ref, _ = reference_batch(hf, ids, mask, pixels, SCHEDULES["vanilla"])
    worst = max(float(np.abs(full[i, c] - lg).max()) for i, r in enumerate(ref) for c, lg in r.items())
    assert worst <= 1e-5, worst
