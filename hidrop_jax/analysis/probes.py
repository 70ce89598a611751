"""Choosing HiDrop's layers for a new model: similarity curves, ILVAS, an exit probe, a proposal.

Pure functions on arrays; `hidrop_jax.analyze` streams data through them, `hidrop.propose`
turns the curves into a schedule and `analysis.plots` draws them.
Layer indices are 0-based, as in our configs (DESIGN §1). All curves are pooled means: every
token (or sample) of every analysed sample weighs the same.

Definitions
-----------
Hidden states. `layer_states` runs the decoder one layer at a time (one `lax.scan` whose ys are
the states) on the stream [text (T) | vision (N)] with persistent positions (rotated by the
family's own positions: M-RoPE rows for Qwen2.5-VL, see `rotary`): h[0] is the input of
layer 0 (embeddings / projector output), h[l + 1] the output of layer l; [L + 1, B, T + N, D].
By default every layer sees every vision token (the "vanilla" model). A per-layer flag
`vision_on[l]` turns the vision tokens off as keys of layer l and freezes their states there, so
`vision_flags(L, inject, exit)` gives exactly the model with late injection and early exit (the
text rows equal `forward`'s under that schedule; tested).

Modalities (rows of samples that have an image): `system` = text rows before the image slot
(BOS, the system prompt, "USER:"), `vision` = the N vision tokens, `text` = valid text rows after
the image (question and, teacher-forced, the answers). `instruction` = the `text` rows up to and
including the last prompt token (the query row of the first round: the last token before the
first answer; without query rows, the last valid token).

Intra-modal similarity, per modality M and layer l:
    intra_M[l] = mean over samples and tokens t in M of cos(h[l]_t, h[l + 1]_t)
i.e. how little layer l changes M's tokens (1 = not at all).

Cross-modal similarity, per layer l (vanilla model):
    cross[l] = mean over samples and instruction tokens t of cos(h[l + 1]_t | the sample's own
               image, h[l + 1]_t | the image of the next sample in the batch (pixels rolled by 1))
≈1 means the instruction states do not depend on the image yet (no fusion up to layer l).
Only pairs where both samples have an image count; a batch needs ≥ 2 samples.

Attention of the last prompt token. At layer l, the layer's own input norm and rotated q/k of
h[l] give the causal fp32 softmax row of the query row (the last prompt token) over all keys,
per head: A_l [H, S] (the probabilities layer l's attention uses; heads of a grouped-query model
map to kv head h // (H / K) as in the attention op). Vision columns: A_l[:, T:] [H, N].

ILVAS(l, l + n, K): the K vision tokens most attended at layer l (head-averaged A_l), S_l; the
head-wise attention vectors of these tokens, a_l = A_l[:, S_l] and a_{l+n} = A_{l+n}[:, S_l]
(each [H, K]); ILVAS = cos(vec(a_l), vec(a_{l+n})), one cosine over the H·K entries ("flat"),
averaged over samples. High = the tokens layer l's attention picks keep (relatively) the same
attention from every head n layers later, so a cut scored at layer l is still right there.
`mode="token"` instead averages, over the K tokens, the cosine of each token's H-vector.
Defined for l with vision tokens present in both l and l + n (l ≥ inject, l + n < exit).

Exit probe: for every e in 1..L, the loss (mean NLL per answer token) and answer accuracy (a
round is right when the argmax at every answer token is the reference) when all vision tokens
are dropped from layer e on (schedule inject 0, no cuts, exit_layer = e), without training; e = L
is the vanilla baseline. Only samples with an image count.
"""


from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hidrop_jax.batch import first_query_row
from hidrop_jax.config import n_vision_tokens
from hidrop_jax.layers.llama import DecoderLayer, Embedder
from hidrop_jax.model import encode_image, lm_logits, rope_for, text_dims


MODALITIES = ("system", "vision", "text")


# ----------------------------------------------------------------------------- running the model

def rotary(cfg, inputs, pos, *, vision: bool):
    """cos/sin of the text rows (+ the vision slots if `vision`): by their order positions `pos`
    (LLaVA), or by the family's M-RoPE rows (`inputs.text_rope` / `vision_rope`) where it has them."""
    if inputs.text_rope is None:
        return rope_for(cfg.model, pos)
    rows = [inputs.text_rope] + ([inputs.vision_rope] if vision else [])
    return rope_for(cfg.model, jnp.moveaxis(jnp.concatenate(rows, axis=-1), 1, 0))


def vision_flags(num_layers: int, inject_layer: int = 0, exit_layer: Optional[int] = None):
    """[L] bool: layer l sees the vision tokens (inject ≤ l < exit)."""
    ex = num_layers if exit_layer is None else exit_layer
    l = np.arange(num_layers)
    return (l >= inject_layer) & (l < ex)


def query_attention(dims, layer_params, x, rope, pos, valid, q_idx):
    """[B, H, S] float32: layer's causal attention probabilities of row `q_idx` [B] over all
    keys of x [B, S, D], per query head (its input norm and rotated q/k, as `score_vision`)."""
    take = lambda a: jnp.take_along_axis(a, q_idx.reshape((-1, 1) + (1,) * (a.ndim - 2)), axis=1)
    q, k, _ = DecoderLayer(dims).apply({"params": layer_params}, take(x), tuple(map(take, rope)),
                                       x, rope, method=DecoderLayer.attention_inputs)
    nh, nk, hd = q.shape[2], k.shape[2], q.shape[3]
    k = jnp.repeat(k, nh // nk, axis=2)  # query head h reads kv head h // (H / K)
    logits = jnp.einsum("bnh,bsnh->bns", q[:, 0], k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(hd))
    q_pos = jnp.take_along_axis(pos, q_idx[:, None], axis=1)
    allowed = (pos <= q_pos) & valid
    return jax.nn.softmax(jnp.where(allowed[:, None, :], logits, -jnp.inf), axis=-1)


def layer_states(cfg, params, inputs, *, vision_on=None, q_idx=None, pixels=None):
    """(hidden [L + 1, B, T + N, D], attn [L, B, H, T + N]) for one batch: see the module doc.

    `vision_on` [L] bool (default all True: the vanilla model); `q_idx` [B] the query row of the
    attention rows (default `first_query_row`); `pixels` replaces `inputs.pixels` (cross-modal).
    """
    m = cfg.model
    td, L, N = text_dims(m), m.text.num_layers, n_vision_tokens(m)
    b, T = inputs.text_ids.shape
    pixels = inputs.pixels if pixels is None else pixels
    if pixels is None:
        raise ValueError("layer_states needs pixels (a batch with images)")
    x = Embedder(td.vocab_size, td.hidden_size, td.dtype).apply(
        {"params": params["text"]["embed_tokens"]}, inputs.text_ids)
    x = jnp.concatenate([x, encode_image(m, params, pixels).astype(x.dtype)], axis=1)
    slot = jnp.asarray(inputs.image_slot)[:, None]
    pos = jnp.concatenate([inputs.text_pos, slot + jnp.arange(N, dtype=jnp.int32)], axis=1)
    alive = jnp.broadcast_to(jnp.asarray(inputs.has_image)[:, None], (b, N))
    rope = rotary(cfg, inputs, pos, vision=True)
    is_vis = (jnp.arange(T + N) >= T)[None, :, None]
    on_all = jnp.ones(L, bool) if vision_on is None else jnp.asarray(vision_on, bool)
    q_idx = first_query_row(inputs) if q_idx is None else q_idx
    layer = DecoderLayer(td)

    def body(x, xs):
        p, on = xs
        valid = jnp.concatenate([inputs.text_valid, alive & on], axis=1)
        attn = query_attention(td, p, x, rope, pos, valid, q_idx)
        y, _ = layer.apply({"params": p}, x, rope, pos, valid)
        y = jnp.where(is_vis & ~on, x, y)  # vision absent from this layer: its state waits
        return y, (y, attn)

    _, (hs, attn) = jax.lax.scan(body, x, (params["text"]["layers"], on_all))
    return jnp.concatenate([x[None], hs], axis=0), attn


def exit_probe(cfg, params, hidden, inputs, labels, loss_mask, weight):
    """For every exit e = 1..L (vision dropped from layer e on, no training): (summed weighted
    NLL over answer tokens [L], weighted answer-token count [], argmax hits [L, B, T]).

    The vanilla states entering layer e are `hidden[e]`; its text rows run layers [e, L)
    text-only (one scan over all layers skipping those before e), then the head.
    """
    m = cfg.model
    td, L = text_dims(m), m.text.num_layers
    T = inputs.text_ids.shape[1]
    pos, valid = inputs.text_pos, inputs.text_valid
    rope = rotary(cfg, inputs, pos, vision=False)
    layer = DecoderLayer(td)
    mask = jnp.asarray(loss_mask) & (jnp.asarray(weight)[:, None] > 0)
    lab = jnp.where(mask, labels, 0)
    w = jnp.asarray(weight, jnp.float32)[:, None] * mask

    def tail(e):
        x0 = jax.lax.dynamic_index_in_dim(hidden, e, 0, keepdims=False)[:, :T]

        def body(x, xs):
            p, i = xs
            x = jax.lax.cond(i >= e, lambda x: layer.apply({"params": p}, x, rope, pos, valid)[0],
                             lambda x: x, x)
            return x, None

        x, _ = jax.lax.scan(body, x0, (params["text"]["layers"], jnp.arange(L)))
        logits = lm_logits(m, params["text"], x)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), lab[..., None], -1)[..., 0]
        return (nll * w).sum(), (logits.argmax(-1) == lab) & mask

    nll, hits = jax.lax.map(tail, jnp.arange(1, L + 1))
    return nll, w.sum(), hits


# ----------------------------------------------------------------------------- statistics

def cosine(a, b, axis=-1, eps=1e-8):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    num = (a * b).sum(axis)
    return num / jnp.maximum(jnp.linalg.norm(a, axis=axis) * jnp.linalg.norm(b, axis=axis), eps)


def modality_masks(inputs, n_vision: int):
    """{system, vision, text, instruction}: [B, T + N] bool (samples with an image only)."""
    img = jnp.asarray(inputs.has_image)[:, None]
    slot = jnp.asarray(inputs.image_slot)[:, None]
    tv, tp = jnp.asarray(inputs.text_valid), jnp.asarray(inputs.text_pos)
    b, T = tv.shape
    rows = jnp.arange(T)[None]
    no_vis = jnp.zeros((b, n_vision), bool)
    no_txt = jnp.zeros((b, T), bool)
    after = tv & (tp > slot) & img
    instr = after & (rows <= first_query_row(inputs)[:, None])
    pad = lambda t: jnp.concatenate([t, no_vis], axis=1)
    return {
        "system": pad(tv & (tp < slot) & img),
        "vision": jnp.concatenate([no_txt, jnp.broadcast_to(img, (b, n_vision))], axis=1),
        "text": pad(after),
        "instruction": pad(instr),
    }


def intra_modal_sums(hidden, masks, weight):
    """(sums [L, len(MODALITIES)], counts [len(MODALITIES)]) of cos(h[l], h[l + 1]) per token,
    weighted by `weight` [B] (0 = sample not counted); curve = sums / counts."""
    cos = cosine(hidden[:-1], hidden[1:])  # [L, B, S]
    w = jnp.asarray(weight, jnp.float32)[:, None]
    ms = jnp.stack([masks[k] * w for k in MODALITIES], axis=-1)  # [B, S, 3]
    return jnp.einsum("lbs,bsm->lm", cos, ms), ms.sum((0, 1))


def cross_modal_sums(hidden_ref, hidden_mis, mask, weight):
    """(sums [L], count []) of cos(h[l + 1] | own image, h[l + 1] | other image) over `mask`."""
    cos = cosine(hidden_ref[1:], hidden_mis[1:])  # [L, B, S]
    w = mask * jnp.asarray(weight, jnp.float32)[:, None]
    return jnp.einsum("lbs,bs->l", cos, w), w.sum()


def ilvas_per_sample(attn_vis, n: int, k: int, mode: str = "flat"):
    """[L − n, B]: ILVAS(l, l + n, K) per sample from vision attention [L, B, H, N]."""
    if mode not in ("flat", "token"):
        raise ValueError(f"ILVAS mode {mode!r} unknown; allowed: 'flat', 'token'")
    L, N = attn_vis.shape[0], attn_vis.shape[-1]
    if not 1 <= n < L:
        raise ValueError(f"ILVAS n={n} needs 1 ≤ n < number of layers ({L})")
    if not 1 <= k <= N:
        raise ValueError(f"ILVAS top-K={k} must be in [1, {N}] (the vision tokens)")
    a, b = attn_vis[:-n], attn_vis[n:]
    _, idx = jax.lax.top_k(a.mean(axis=2), k)  # [L-n, B, K] most attended at layer l
    g = lambda x: jnp.take_along_axis(x, idx[:, :, None, :], axis=-1)  # [L-n, B, H, K]
    ga, gb = g(a), g(b)
    if mode == "flat":
        return cosine(ga.reshape(ga.shape[:2] + (-1,)), gb.reshape(gb.shape[:2] + (-1,)))
    return cosine(ga, gb, axis=2).mean(-1)


def ilvas_sums(attn, n_text: int, ns: Sequence[int], k: int, weight, mode: str = "flat"):
    """{n: sums [L − n]} and the weighted sample count, from attention [L, B, H, T + N]."""
    w = jnp.asarray(weight, jnp.float32)
    vis = attn[..., n_text:]
    return {n: ilvas_per_sample(vis, n, k, mode) @ w for n in ns}, w.sum()


def batch_statistics(cfg, params, inputs, labels, loss_mask, weight, *, ns=(4, 8), topk=8,
                     ilvas_vision_on=None, ilvas_mode="flat", curves=True, ilvas=True):
    """Every summed statistic of one batch (jit it with the keyword args static, except
    `ilvas_vision_on`, an [L] bool array). `weight` [B] counts a sample (0/1); vision statistics
    only count samples with an image. ILVAS runs on the vanilla states unless `ilvas_vision_on`
    gives another model (late injection / early exit)."""
    N = n_vision_tokens(cfg.model)
    T = inputs.text_ids.shape[1]
    w = jnp.asarray(weight, jnp.float32)
    w_img = w * jnp.asarray(inputs.has_image, jnp.float32)
    out = {}
    hidden = attn = None
    if curves or (ilvas and ilvas_vision_on is None):
        hidden, attn = layer_states(cfg, params, inputs)
    if curves:
        masks = modality_masks(inputs, N)
        out["intra_sum"], out["intra_count"] = intra_modal_sums(hidden, masks, w_img)
        other = jnp.roll(inputs.pixels, 1, axis=0)
        pair = w_img * jnp.roll(jnp.asarray(inputs.has_image, jnp.float32), 1)
        pair = pair * (inputs.text_ids.shape[0] > 1)
        hidden_mis, _ = layer_states(cfg, params, inputs, pixels=other)
        out["cross_sum"], out["cross_count"] = cross_modal_sums(
            hidden, hidden_mis, masks["instruction"], pair)
        out["probe_nll"], out["probe_tokens"], out["probe_hits"] = exit_probe(
            cfg, params, hidden, inputs, labels, loss_mask, w_img)
        out["probe_hit_sum"] = (out["probe_hits"] * w_img[:, None]).sum((1, 2))
    if ilvas:
        if ilvas_vision_on is not None:
            _, attn = layer_states(cfg, params, inputs, vision_on=ilvas_vision_on)
        out["ilvas_sum"], out["ilvas_count"] = ilvas_sums(attn, T, ns, topk, w_img, ilvas_mode)
    return out


def round_accuracy(hits, loss_mask, label_round, weight):
    """(correct rounds [E], rounds []) from per-token hits [E, B, T]: a round is right when
    every one of its answer tokens is. Numpy (host side)."""
    hits, mask = np.asarray(hits), np.asarray(loss_mask, bool)
    rounds, w = np.asarray(label_round), np.asarray(weight) > 0
    correct, total = np.zeros(hits.shape[0]), 0
    for b in np.flatnonzero(w):
        for r in np.unique(rounds[b][mask[b]]):
            sel = mask[b] & (rounds[b] == r)
            correct += hits[:, b][:, sel].all(axis=1)
            total += 1
    return correct, total
