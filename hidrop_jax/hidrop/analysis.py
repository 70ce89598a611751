"""Choosing HiDrop's layers for a new model: similarity curves, ILVAS, an exit probe, a proposal.

Pure functions on arrays; `hidrop_jax.analyze` streams data through them and draws the plots.
Layer indices are 0-based, as in our configs (DESIGN §1). All curves are pooled means: every
token (or sample) of every analysed sample weighs the same.

Definitions
-----------
Hidden states. `layer_states` runs the decoder one layer at a time (one `lax.scan` whose ys are
the states) on the stream [text (T) | vision (N)] with persistent positions: h[0] is the input of
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

Proposal rules (`propose`)
--------------------------
- inject_layer: the vision intra-modal curve's interior local minima (1 ≤ l ≤ L − 2, c[l] <
  c[l − 1] and c[l] ≤ c[l + 1]) each get a dip depth (prominence) min(max c[:l], max c[l+1:]) −
  c[l]; the *earliest* minimum whose depth is at least `min_prominence` (0.5) × the deepest
  one's is chosen (shallow noise dips are ignored; of comparable dips the first, where the layers
  start transforming the vision tokens). No interior minimum: inject at 0 (no late injection).
- exit_layer: the earliest e whose probe loss *stays* within `tolerance` (relative, 2 %) of the
  baseline for every e' ≥ e: loss[e'] ≤ (1 + tol)·loss[L]. e = L means no early exit. Raised to
  inject + 2 if it would leave no room for a cut after injection.
- prune_after: the ILVAS curves (mean over the n given where defined) have interior local maxima
  (s[l] > s[l − 1], s[l] ≥ s[l + 1]); we keep those after injection with room before the exit,
  the `max_cuts` (4) highest, in layer order. A maximum at layer l means layer l's attention
  picks a stable set; our cut after layer p scores with layer p + 1's attention, so the cut goes
  after l − 1: prune_after = l − 1 ∈ [inject, exit − 2]. No maximum: the argmax (one cut).
- keep: a geometric ("concave": steep first cut, long thin tail) profile k_i = k_1·r^(i−1) with
  k_m = 1 (r = k_1^(−1/(m−1))); k_1 is found by bisection so the schedule's mean vision tokens
  per layer (over all L layers) hits `budget`, then rounded (strictly decreasing) and refined
  over integer k_1 to within one token. If k_1 = N is still under budget, the tail end rises
  from 1 (bisection on it). A budget the layer layout cannot reach raises, naming it and the
  reachable range; if it is too small only because the first stage is long, a cut right after
  injection is added first (replacing the first one if max_cuts are used; noted). Validated by
  `schedule.validate`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hidrop_jax.hidrop.schedule import Schedule

MODALITIES = ("system", "vision", "text")


# ----------------------------------------------------------------------------- running the model

def vision_flags(num_layers: int, inject_layer: int = 0, exit_layer: Optional[int] = None):
    """[L] bool: layer l sees the vision tokens (inject ≤ l < exit)."""
    ex = num_layers if exit_layer is None else exit_layer
    l = np.arange(num_layers)
    return (l >= inject_layer) & (l < ex)


def last_prompt_row(inputs):
    """[B] int32: the first round's query row if the batch has query rows, else the last valid
    text row (the inference query row)."""
    last = jnp.argmax(jnp.where(inputs.text_valid, inputs.text_pos, -1), axis=1).astype(jnp.int32)
    if inputs.query_idx is None:
        return last
    q = jnp.asarray(inputs.query_idx)[:, 0].astype(jnp.int32)
    return jnp.where(jnp.asarray(inputs.query_valid)[:, 0], q, last)


def query_attention(dims, layer_params, x, rope, pos, valid, q_idx):
    """[B, H, S] float32: layer's causal attention probabilities of row `q_idx` [B] over all
    keys of x [B, S, D], per query head (its input norm and rotated q/k, as `score_vision`)."""
    from hidrop_jax.layers.llama import DecoderLayer
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
    attention rows (default `last_prompt_row`); `pixels` replaces `inputs.pixels` (cross-modal).
    """
    from hidrop_jax.config import n_vision_tokens
    from hidrop_jax.layers.llama import DecoderLayer, Embedder
    from hidrop_jax.layers.rope import rope_tables
    from hidrop_jax.model import encode_image, text_dims
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
    rope = rope_tables(pos, td.head_dim, td.rope_theta)
    is_vis = (jnp.arange(T + N) >= T)[None, :, None]
    on_all = jnp.ones(L, bool) if vision_on is None else jnp.asarray(vision_on, bool)
    q_idx = last_prompt_row(inputs) if q_idx is None else q_idx
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
    from hidrop_jax.layers.llama import DecoderLayer
    from hidrop_jax.layers.rope import rope_tables
    from hidrop_jax.model import lm_logits, text_dims
    m = cfg.model
    td, L = text_dims(m), m.text.num_layers
    T = inputs.text_ids.shape[1]
    pos, valid = inputs.text_pos, inputs.text_valid
    rope = rope_tables(pos, td.head_dim, td.rope_theta)
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
    instr = after & (rows <= last_prompt_row(inputs)[:, None])
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
    from hidrop_jax.config import n_vision_tokens
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


# ----------------------------------------------------------------------------- proposal

def _finite(c):
    return np.asarray([np.nan if v is None else v for v in c], float)


def local_minima(curve, lo: int = 1, hi: Optional[int] = None):
    """Interior strict-left local minima l in [lo, hi]: c[l] < c[l−1] and c[l] ≤ c[l+1]."""
    c = _finite(curve)
    hi = len(c) - 2 if hi is None else min(hi, len(c) - 2)
    return [l for l in range(max(lo, 1), hi + 1)
            if np.isfinite(c[l - 1:l + 2]).all() and c[l] < c[l - 1] and c[l] <= c[l + 1]]


def local_maxima(curve, lo: int = 1, hi: Optional[int] = None):
    """Interior local maxima l in [lo, hi]: c[l] > c[l−1] and c[l] ≥ c[l+1] (finite)."""
    return local_minima(-_finite(curve), lo, hi)


def pick_injection(vision_curve, min_prominence: float = 0.5):
    """(inject_layer, details): see the module doc's rule."""
    c = _finite(vision_curve)
    if not np.isfinite(c).any():
        raise ValueError("the vision intra-modal curve is empty: no analysed sample has an image")
    cands = local_minima(c)
    if not cands:
        return 0, dict(candidates=[], note="no interior local minimum of the vision curve: "
                                             "inject at layer 0 (no late injection)")
    prom = {l: float(min(np.nanmax(c[:l]), np.nanmax(c[l + 1:])) - c[l]) for l in cands}
    deepest = max(prom.values())
    chosen = next(l for l in cands if prom[l] >= min_prominence * deepest)
    return chosen, dict(candidates=cands, prominence={str(l): p for l, p in prom.items()},
                        min_prominence=min_prominence)


def pick_exit(probe_loss, tolerance: float = 0.02):
    """(exit_layer in 1..L, details) from the probe's loss per exit e = 1..L (index e − 1)."""
    loss = _finite(probe_loss)
    L = len(loss)
    if tolerance < 0:
        raise ValueError(f"tolerance = {tolerance!r}; allowed: ≥ 0 (relative loss increase)")
    base = loss[-1]
    if not np.isfinite(base):
        return L, dict(note="no answer tokens in the data: no exit probe, no early exit")
    ok = loss <= base * (1 + tolerance) + 1e-12
    e = L
    while e > 1 and ok[e - 2]:
        e -= 1
    return e, dict(baseline_loss=float(base), tolerance=tolerance,
                   limit=float(base * (1 + tolerance)))


def pick_prune_layers(ilvas_curves: dict, inject: int, exit_layer: int, max_cuts: int = 4):
    """(prune_after tuple, details): ILVAS local maxima at l ∈ [inject + 1, exit − 1], the
    `max_cuts` highest, cut after l − 1 (see the module doc)."""
    curves = [_finite(c) for c in ilvas_curves.values()]
    if not curves:
        raise ValueError("no ILVAS curve given")
    L = len(curves[0])
    stack = np.stack([np.pad(c, (0, L - len(c)), constant_values=np.nan) for c in curves])
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s = np.nanmean(stack, axis=0)
    lo, hi = inject + 1, exit_layer - 1
    details = dict(combined=[None if not np.isfinite(v) else float(v) for v in s], range=[lo, hi])
    if hi < lo or max_cuts < 1:
        return (), dict(details, note="no room for a cut between injection and exit")
    cands = local_maxima(s, lo, hi)
    details["maxima"] = cands
    if not cands:
        inside = [l for l in range(lo, hi + 1) if np.isfinite(s[l])]
        if inside:
            cands = [max(inside, key=lambda l: s[l])]
            details["note"] = "no ILVAS local maximum after injection: one cut at its argmax"
        else:
            cands = [lo]
            details["note"] = ("ILVAS undefined after injection (too few layers for n): one cut "
                               "right after the injection layer")
    chosen = sorted(sorted(cands, key=lambda l: -s[l] if np.isfinite(s[l]) else 0)[:max_cuts])
    details["ilvas_layers"] = chosen
    return tuple(l - 1 for l in chosen), details


def stage_lengths(num_layers: int, inject: int, prune_after, exit_layer: int):
    """Layers per stage: [first stage (all tokens), after cut 1, ..., after cut m]."""
    cuts = list(prune_after)
    bounds = [inject] + [p + 1 for p in cuts] + [exit_layer]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _geometric(k1: float, m: int, end: float = 1.0):
    if m == 1:
        return [k1]
    r = (end / k1) ** (1.0 / (m - 1))
    return [k1 * r ** i for i in range(m)]


def _integer(raw, n_vision: int):
    """Round, then enforce strictly decreasing counts ≥ 1 from the tail, first ≤ n_vision."""
    k = [max(1, int(round(v))) for v in raw]
    for i in range(len(k) - 2, -1, -1):
        k[i] = max(k[i], k[i + 1] + 1)
    return k if k[0] <= n_vision else None


def solve_keep(n_vision: int, num_layers: int, inject: int, prune_after, exit_layer: int,
               budget: float):
    """Keep counts (a concave/geometric profile ending at 1) whose schedule's mean vision tokens
    per layer is within one token of `budget`; raises naming the budget and the reachable range.
    """
    m = len(prune_after)
    lens = stage_lengths(num_layers, inject, prune_after, exit_layer)
    fixed = n_vision * lens[0]
    mean = lambda k: (fixed + sum(a * b for a, b in zip(k, lens[1:]))) / num_layers
    if budget > n_vision:
        raise ValueError(f"budget = {budget!r} mean vision tokens per layer is larger than the "
                         f"{n_vision} vision tokens of this model")
    if m == 0:
        got = mean([])
        if abs(got - budget) > 1:
            raise ValueError(f"budget = {budget!r} cannot be met without cuts: injection at "
                             f"{inject} and exit at {exit_layer} give {got:.2f} tokens per layer")
        return ()
    lo_k = list(range(m, 0, -1))
    lo_mean = mean(lo_k)
    hi_k = list(range(n_vision, n_vision - m, -1))
    hi_mean = mean(hi_k) if hi_k[-1] >= 1 else lo_mean
    if budget < lo_mean - 1:
        raise ValueError(
            f"budget = {budget!r} is below the {lo_mean:.2f} tokens per layer this layout needs at "
            f"least (all {n_vision} tokens in layers {inject}..{inject + lens[0] - 1}, then "
            f"keep {tuple(lo_k)}); raise the budget or inject/cut earlier")
    if budget > hi_mean + 1:
        raise ValueError(
            f"budget = {budget!r} is above the {hi_mean:.2f} tokens per layer this layout can use "
            f"(injection {inject}, exit {exit_layer}, {m} cuts); lower the budget")
    if m == 1:  # a single cut: its count alone meets the budget
        return (min(range(1, n_vision + 1), key=lambda v: abs(mean([v]) - budget)),)

    def solve_k1(end):
        """Bisection on k_1 for a tail ending at `end`; the closest integer counts (or None)."""
        keep_for = lambda k1: _integer(_geometric(k1, m, end), n_vision)
        lo, hi = max(float(m), end), float(n_vision)
        if keep_for(lo) is None:
            return None
        for _ in range(60):
            mid = (lo + hi) / 2
            km = keep_for(mid)
            if km is None or mean(km) > budget:
                hi = mid
            else:
                lo = mid
        near = [keep_for(v) for v in range(max(m, int(lo) - 2), min(n_vision, int(hi) + 2) + 1)]
        near = [k for k in near if k is not None]
        return min(near, key=lambda k: abs(mean(k) - budget)) if near else None

    # The smallest tail end (1 first) whose solution is concave including the first cut
    # (N → k_1 the largest drop) and within one token of the budget.
    fallback = None
    for end in range(1, n_vision - m + 2):
        k = solve_k1(float(end))
        if k is None or abs(mean(k) - budget) > 1:
            continue
        if is_concave(n_vision, k):
            return tuple(k)
        fallback = fallback or k
    if fallback is None:  # k_1 = N is still under budget: the tail end rises (bisection on it)
        lo, hi = 1.0, float(n_vision)
        for _ in range(60):
            mid = (lo + hi) / 2
            km = _integer(_geometric(n_vision, m, mid), n_vision)
            if km is None or mean(km) > budget:
                hi = mid
            else:
                lo = mid
        cands = [_integer(_geometric(n_vision, m, e), n_vision)
                 for e in np.linspace(max(1.0, lo - 1), hi + 1, 41)]
        cands = [c for c in cands if c is not None]
        fallback = min(cands, key=lambda k: abs(mean(k) - budget)) if cands else None
    if fallback is None or abs(mean(fallback) - budget) > 1:
        got = "none" if fallback is None else f"{tuple(fallback)} giving {mean(fallback):.2f}"
        raise ValueError(f"budget = {budget!r}: no decreasing keep counts within one token "
                         f"(closest: {got})")
    return tuple(fallback)


def is_concave(n_vision: int, keep) -> bool:
    """Strictly decreasing counts whose drops (n_vision → k_1 → … → k_m) never grow."""
    seq = [n_vision, *keep]
    drops = [a - b for a, b in zip(seq[:-1], seq[1:])]
    return all(d > 0 for d in drops[1:]) and all(a >= b for a, b in zip(drops[:-1], drops[1:]))


def propose(*, vision_curve, ilvas_curves: dict, probe_loss, num_layers: int, n_vision: int,
            budget: float, tolerance: float = 0.02, max_cuts: int = 4,
            min_prominence: float = 0.5):
    """The proposed schedule (a validated `Schedule`) and a details dict, from the curves:
    `vision_curve` [L] (intra-modal, vision), `ilvas_curves` {n: [L] with None/NaN where
    undefined}, `probe_loss` [L] (exit e = index + 1). Rules: module doc."""
    L = num_layers
    notes = []
    inject, d_inj = pick_injection(vision_curve, min_prominence)
    probe_exit, d_exit = pick_exit(probe_loss, tolerance)
    exit_layer = probe_exit
    if exit_layer < inject + 2:
        exit_layer = min(L, inject + 2)
        notes.append(f"probe exit {probe_exit} is not after injection {inject} with room for a cut:"
                     f" exit raised to {exit_layer}")
    prune, d_prune = pick_prune_layers(ilvas_curves, inject, exit_layer, max_cuts)
    try:
        keep = solve_keep(n_vision, L, inject, prune, exit_layer, budget)
    except ValueError as first_error:
        # Too small a budget because the first stage is long: cut right after injection first.
        if not prune or prune[0] == inject or "below" not in str(first_error):
            raise
        rest = prune if len(prune) < max_cuts else prune[1:]
        moved = (inject,) + tuple(p for p in rest if p > inject)
        keep = solve_keep(n_vision, L, inject, moved, exit_layer, budget)
        notes.append(f"budget {budget} unreachable with the first cut after layer {prune[0]}: "
                     f"added a cut right after the injection layer {inject}")
        prune = moved
    s = Schedule(num_layers=L, n_vision=n_vision, inject_layer=inject, prune_after=prune,
                 keep=keep, exit_layer=exit_layer)
    details = dict(
        injection=d_inj, exit=dict(d_exit, probe_exit=probe_exit), pruning=d_prune,
        keep=dict(budget=budget, mean_tokens=s.mean_tokens(), concave=is_concave(n_vision, keep),
                  stage_lengths=stage_lengths(L, inject, prune, exit_layer)),
        notes=notes)
    return s, details


def schedule_dict(s: Schedule) -> dict:
    return dict(inject_layer=s.inject_layer, prune_after=list(s.prune_after), keep=list(s.keep),
                exit_layer=s.exit, tokens_per_layer=s.tokens_per_layer(),
                mean_tokens=s.mean_tokens())


def config_flags(s: Schedule) -> str:
    """`--config.hidrop...` overrides of the schedule. ml_collections cannot override a field
    whose value is None, so the exit is always an int (L = no early exit) and the base config
    should use a schedule with an int exit (e.g. `:schedule=tok64`)."""
    tup = lambda t: "'(" + ",".join(map(str, t)) + ("," if len(t) == 1 else "") + ")'"
    return (f"--config.hidrop.inject_layer={s.inject_layer} "
            f"--config.hidrop.prune_after={tup(s.prune_after)} "
            f"--config.hidrop.keep={tup(s.keep)} --config.hidrop.exit_layer={s.exit}")


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
