"""HiDrop inference in PyTorch: what every exported HiDrop modeling file shares (torch only).

`hidrop_jax` copies this file verbatim beside `modeling_hidrop_llava.py` or
`modeling_hidrop_qwen2_5_vl.py` in an export; they import it relatively (transformers' remote-code
loader copies relative imports along). It holds the family-independent method, exactly as
`hidrop_jax.model.forward_hidden` runs it (all layer indices 0-based):
  * the schedule and its validation (the rules of `hidrop_jax.hidrop.schedule.validate`; a keep
    entry is a count, or a float fraction in (0, 1) of the sample's vision tokens);
  * late injection: layers [0, inject_layer) see the text tokens only;
  * cuts: after each layer in `prune_after`, keep `keep[i]` vision tokens, scored by the next
    layer's input RMSNorm + q/k projections (with their bias, if any) + RoPE: attention
    probabilities (causal by sequence order, fp32 softmax) of the query rows over all present
    keys, mean over heads, vision columns, mean over query rows; hard top-k (ties to the earlier
    token), kept tokens stay in their original order;
  * persistent positions: every token keeps the order (masks, causality) and the rotary position
    (1-D, or M-RoPE's (t, h, w)) it has in the full sequence;
  * exit: from `exit_layer` on no vision token is left;
  * decoding with HF's `DynamicCache`: each layer's cache holds the keys that layer kept (a
    per-layer length); `cache.hidrop_positions` / `cache.hidrop_valid` hold their orders.
A family supplies the embedded sequence (image features scattered in), the orders, the rotary
positions and how its rotary embedding takes them.
"""

import torch

FIELDS = ("name", "inject_layer", "prune_after", "keep", "exit_layer", "selection", "positions",
          "temperature")
SELECTIONS = ("hard", "relaxed", "mask")  # training-time choices; inference is hard top-k for all


def _bad(field, value, allowed):
    raise ValueError(f"hidrop.{field} = {value!r} is invalid; allowed: {allowed}")


def _int(field, value):
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(field, value, "an int")
    return value


def _keep_entry(i, k):
    """An int count, or a float fraction in (0, 1) (an integral float is a count)."""
    if isinstance(k, float) and not isinstance(k, bool):
        if k.is_integer():
            return int(k)
        if not 0 < k < 1:
            _bad(f"keep[{i}]", k, "an int count, or a float fraction in (0, 1) of the vision tokens")
        return k
    return _int(f"keep[{i}]", k)


def keep_counts(keep, n_vision: int):
    """Counts for a sample with `n_vision` vision tokens: a fraction is max(1, round(f · n))
    (as `hidrop_jax.hidrop.schedule.keep_count`); fails unless strictly decreasing within n."""
    counts, avail = [], n_vision
    for i, k in enumerate(keep):
        c = max(1, round(k * n_vision)) if isinstance(k, float) else k
        limit = avail if i == 0 else avail - 1
        if not 1 <= c <= limit:
            _bad(f"keep[{i}]", k, f"an int in [1, {limit}] (strictly decreasing, at most the {avail} "
                                  "tokens available)" + (f"; {k} of {n_vision} tokens is {c}"
                                                         if isinstance(k, float) else ""))
        counts.append(c)
        avail = c
    return counts


def validate_schedule(schedule, num_layers: int, n_vision=None):
    """The normalised schedule dict, or None for vanilla. Fails naming the field, the value and
    what is allowed. Keep counts are checked against `n_vision` when the model has a fixed token
    count (else against each sample's count, at run time: `keep_counts`)."""
    if schedule is None or schedule == "vanilla":
        return None
    if not isinstance(schedule, dict):
        _bad("schedule", schedule, "a dict of fields, None or 'vanilla'")
    unknown = sorted(set(schedule) - set(FIELDS))
    if unknown:
        _bad(unknown[0], schedule[unknown[0]], f"fields {FIELDS}")
    h = dict(schedule)
    L = num_layers
    if h.get("selection", "hard") not in SELECTIONS:
        _bad("selection", h["selection"], f"one of {SELECTIONS}")
    if h.get("positions", "persistent") != "persistent":
        _bad("positions", h["positions"], "'persistent' (the only numbering this model implements)")
    inject = _int("inject_layer", h.get("inject_layer", 0))
    if not 0 <= inject < L:
        _bad("inject_layer", inject, f"an int in [0, {L - 1}] (model has {L} layers)")
    exit_layer = h.get("exit_layer")
    ex = L if exit_layer is None else _int("exit_layer", exit_layer)
    if not inject < ex <= L:
        _bad("exit_layer", exit_layer, f"None or an int in [{inject + 1}, {L}] (after inject_layer)")
    prune = [_int(f"prune_after[{i}]", p) for i, p in enumerate(h.get("prune_after") or ())]
    keep = [_keep_entry(i, k) for i, k in enumerate(h.get("keep") or ())]
    if len(keep) != len(prune):
        _bad("keep", keep, f"one count per prune_after layer ({len(prune)} values)")
    prev = inject - 1
    for i, p in enumerate(prune):
        if not (prev < p and inject <= p and p + 1 < ex):
            _bad(f"prune_after[{i}]", p, f"strictly increasing ints in [{max(prev + 1, inject)}, "
                                         f"{ex - 2}] (from inject_layer={inject}, at least one layer before exit={ex})")
        prev = p
    if n_vision is not None:
        keep_counts(keep, n_vision)
    else:  # without a token count: each entry alone, and entries of one kind decreasing
        for i, k in enumerate(keep):
            if isinstance(k, int) and k < 1:
                _bad(f"keep[{i}]", k, "an int ≥ 1, or a float fraction in (0, 1)")
            if i and type(keep[i - 1]) is type(k) and not k < keep[i - 1]:
                _bad(f"keep[{i}]", k, f"less than keep[{i - 1}] = {keep[i - 1]} (strictly decreasing)")
    h.update(inject_layer=inject, prune_after=prune, keep=keep,
             exit_layer=None if ex == L else ex)
    if inject == 0 and not prune and ex == L:
        return None
    return h


def tokens_per_layer(h, num_layers: int, n_vision: int) -> list:
    """Vision tokens each decoder layer holds for a sample with `n_vision` of them."""
    if h is None:
        return [n_vision] * num_layers
    ex = num_layers if h["exit_layer"] is None else h["exit_layer"]
    keep = keep_counts(h["keep"], n_vision)
    out, n = [], 0
    for layer in range(num_layers):
        n = n_vision if layer == h["inject_layer"] else (0 if layer == ex else n)
        out.append(n)
        if layer in h["prune_after"]:
            n = keep[h["prune_after"].index(layer)]
    return out


def check_beams(gc, kwargs, schedule):
    beams = kwargs.get("num_beams") or getattr(gc, "num_beams", 1) or 1
    if beams > 1 and schedule is not None:
        raise ValueError(f"num_beams = {beams} is not supported under a HiDrop schedule (its "
                         "per-layer cache positions are not reordered); allowed: 1 (greedy or "
                         "sampling), or set_hidrop_schedule('vanilla')")


class HiDropSchedule:
    """The schedule API of both modeling files: `config.hidrop`, validated against the decoder's
    depth and `_hidrop_n_vision` (None: keep counts are checked per sample when the model runs)."""

    _hidrop_n_vision = None

    def __init__(self, config):
        super().__init__(config)  # the HF model class that follows this one in the MRO
        self.hidrop_kept = None  # after each prefill: the kept vision tokens' indices per cut
        self.set_hidrop_schedule(getattr(config, "hidrop", None))

    def set_hidrop_schedule(self, schedule=None, **fields):
        """Sets (and validates) `config.hidrop`. `schedule`: a dict of fields, None or "vanilla";
        `fields` override single fields of the current (or given) schedule, e.g.
        `set_hidrop_schedule(exit_layer=None)`."""
        if schedule is None and fields:
            schedule = dict(getattr(self.config, "hidrop", None) or {})
        if fields:
            schedule = dict({} if schedule in (None, "vanilla") else schedule, **fields)
        self.config.hidrop = validate_schedule(schedule, self.config.text_config.num_hidden_layers,
                                               self._hidrop_n_vision)
        return self.config.hidrop

    @property
    def hidrop_schedule(self):
        """The validated schedule in force (None = vanilla); `config.hidrop` may be edited directly."""
        return validate_schedule(getattr(self.config, "hidrop", None),
                                 self.config.text_config.num_hidden_layers, self._hidrop_n_vision)


def default_order(attention_mask):
    """HF generation's positions of a padded batch: cumsum(attention_mask) − 1, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- token bookkeeping

def _compact(keep):
    """keep [B, S] bool -> (order [B, S'] slot indices, kept first in their original order;
    ok [B, S'] whether the slot holds a kept token), S' = the most any row keeps."""
    n = keep.sum(1)
    width = int(n.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    ok = torch.arange(width, device=keep.device)[None] < n[:, None]
    return order, ok


def _take(a, idx):
    """a [B, S, ...] gathered along dim 1 at idx [B, S']."""
    return a.gather(1, idx.view(idx.shape + (1,) * (a.dim() - 2)).expand(idx.shape + a.shape[2:]))


def additive_mask(q_pos, k_pos, k_valid, dtype):
    """[B, 1, Q, S] 0 / dtype-min: a key is seen when valid and not after the query (orders)."""
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class Tokens:
    """The tokens a layer holds, in original order: hidden states and per-slot bookkeeping
    (src: column in the input, pos: order, rot [B, S, R]: rotary position rows, vis: index among
    the sample's vision tokens or −1)."""

    def __init__(self, h, src, pos, rot, valid, vis):
        self.h, self.src, self.pos, self.rot, self.valid, self.vis = h, src, pos, rot, valid, vis
        self._mask = None

    def mask(self):
        """The layers' attention mask over these tokens (built once per stage)."""
        if self._mask is None:
            self._mask = additive_mask(self.pos, self.pos, self.valid, self.h.dtype)
        return self._mask

    def select(self, keep):
        order, ok = _compact(keep)
        return Tokens(_take(self.h, order), _take(self.src, order).masked_fill(~ok, -1),
                      _take(self.pos, order), _take(self.rot, order), _take(self.valid, order) & ok,
                      _take(self.vis, order).masked_fill(~ok, -1))


def _rotate(x, cos, sin):
    """RoPE as transformers applies it (rotate_half) to x [B, H, S, hd], cos/sin [B, S, hd]."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def score_vision(layer, tokens, rope, q_idx, q_ok):
    """[B, S]: per slot, the attention the query rows pay it in `layer` (fp32 softmax over the
    slots they may see, mean over heads, mean over the valid query rows)."""
    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(tokens.h)
    B, S, _ = x.shape
    Q = q_idx.shape[1]
    cos, sin = rope
    q = _rotate(attn.q_proj(_take(x, q_idx)).view(B, Q, -1, hd).transpose(1, 2),
                _take(cos, q_idx), _take(sin, q_idx))
    k = _rotate(attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / hd ** 0.5  # [B, H, Q, S]
    q_pos = tokens.pos.gather(1, q_idx)
    allowed = (tokens.pos[:, None, :] <= q_pos[:, :, None]) & tokens.valid[:, None, :]
    allowed = allowed | ~q_ok[:, :, None]  # an absent query row: any finite row, weighted 0
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).mean(1)
    w = q_ok.float()
    return (probs * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)


def query_rows(tokens, query_index, query_mask, L):
    """(slot indices [B, Q], valid [B, Q]) of the scoring query rows in `tokens`: the last
    prompt token (the valid text token of the largest order), or the given input columns."""
    text = (tokens.vis < 0) & tokens.valid
    if query_index is None:
        last = torch.where(text, tokens.pos, torch.full_like(tokens.pos, -1)).argmax(1)
        return last[:, None], text.any(1, keepdim=True)
    inv = torch.full((tokens.src.shape[0], L + 1), 0, dtype=torch.long, device=tokens.src.device)
    src = tokens.src.masked_fill(tokens.src < 0, L)
    slots = torch.arange(src.shape[1], device=src.device)[None].expand_as(src)
    inv.scatter_(1, src, slots)
    return inv.gather(1, query_index.clamp(0, L - 1)), query_mask


def check_query_index(is_img, query_index, query_mask):
    """The query mask as bool [B, Q]; query rows must be text columns."""
    if query_index is None:
        return None
    L = is_img.shape[1]
    query_mask = (torch.ones_like(query_index, dtype=torch.bool) if query_mask is None
                  else query_mask.bool())
    if bool((is_img.gather(1, query_index.clamp(0, L - 1)) & query_mask).any()):
        raise ValueError("hidrop_query_index points at an image token; allowed: text columns")
    return query_mask


# ----------------------------------------------------------------------------- the method

def _run_layer(layer, tokens, rope, cache):
    out = layer(tokens.h, attention_mask=tokens.mask(), position_embeddings=rope, cache=cache,
                use_cache=cache is not None)
    tokens.h = out[0] if isinstance(out, tuple) else out
    if cache is not None:
        cache.hidrop_positions.append(tokens.pos)
        cache.hidrop_valid.append(tokens.valid)


def prefill(lm, rotary, h, x, vis, order, rot, valid, keep, cache, query_index=None,
            query_mask=None):
    """(final hidden states [B, L, D], zeros where no token is left; kept) under schedule `h`.

    lm: the decoder (layers, embed); rotary(x, rot [B, S, R]) -> (cos, sin); x [B, L, D] the
    embedded input with the image features at the vision tokens; vis [B, L] each vision token's
    index among its sample's (−1: text); order [B, L]; rot [B, L, R] rotary positions; valid
    [B, L]; keep: per cut a [B] tensor of counts; cache: a fresh `DynamicCache` or None.
    kept: per cut the kept vision indices [B, max count] (−1: none)."""
    B, L = vis.shape
    dev = vis.device
    has_vision = bool((vis >= 0).any())
    full = Tokens(x, torch.arange(L, device=dev)[None].expand(B, L), order, rot, valid, vis)
    n_layers = len(lm.layers)
    ex = n_layers if h["exit_layer"] is None else h["exit_layer"]
    # padding never enters: every row holds only its real tokens (a ragged batch pads the
    # shorter rows of each layer with empty slots)
    tokens = full.select(full.valid & ((vis < 0) if has_vision and h["inject_layer"] > 0 else True))
    injected = has_vision and h["inject_layer"] == 0
    rope = rotary(x, tokens.rot)
    if cache is not None:
        cache.hidrop_positions, cache.hidrop_valid = [], []
    kept = []
    for layer_idx in range(n_layers):
        if has_vision and layer_idx == h["inject_layer"] and not injected:
            buf = torch.cat([x, x.new_zeros(B, 1, x.shape[-1])], 1)  # column L: empty slots
            src = tokens.src.masked_fill(tokens.src < 0, L)
            buf = buf.scatter(1, src[..., None].expand_as(tokens.h), tokens.h)
            tokens = Tokens(buf[:, :L], full.src, full.pos, full.rot, full.valid, full.vis).select(full.valid)
            injected = True
            rope = rotary(x, tokens.rot)
        if injected and layer_idx == ex:
            tokens, injected = tokens.select((tokens.vis < 0) & (tokens.src >= 0)), False
            rope = rotary(x, tokens.rot)
        _run_layer(lm.layers[layer_idx], tokens, rope, cache)
        if injected and layer_idx in h["prune_after"]:
            k = keep[h["prune_after"].index(layer_idx)].to(dev)
            q_idx, q_ok = query_rows(tokens, query_index, query_mask, L)
            scores = score_vision(lm.layers[layer_idx + 1], tokens, rope, q_idx, q_ok)
            text = (tokens.vis < 0) & (tokens.src >= 0)
            scores = scores.masked_fill(tokens.vis < 0, float("-inf"))
            ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(ranked).scatter_(
                1, ranked, torch.arange(ranked.shape[1], device=dev)[None].expand_as(ranked))
            tokens = tokens.select(text | ((tokens.vis >= 0) & (rank < k[:, None])))
            big = torch.iinfo(tokens.vis.dtype).max
            width = int(k.max())
            ids = torch.sort(tokens.vis.masked_fill(tokens.vis < 0, big), dim=1).values[:, :width]
            kept.append(ids.masked_fill(ids == big, -1))
            rope = rotary(x, tokens.rot)
    out = torch.zeros(B, L + 1, x.shape[-1], dtype=tokens.h.dtype, device=dev)
    src = tokens.src.masked_fill(tokens.src < 0, L)
    return out.scatter(1, src[..., None].expand_as(tokens.h), tokens.h)[:, :L], kept


def decode(lm, rotary, x, order, rot, valid, cache):
    """Hidden states [B, Q, D] of new tokens x [B, Q, D] (orders [B, Q], rotary positions
    [B, Q, R]) against each layer's kept keys in `cache`, which they extend."""
    rope = rotary(x, rot)
    stages = {}  # the layers of a stage share their bookkeeping tensors: extend them once
    for layer_idx, layer in enumerate(lm.layers):
        old = cache.hidrop_positions[layer_idx]
        if id(old) not in stages:
            k_pos = torch.cat([old, order], 1)
            k_valid = torch.cat([cache.hidrop_valid[layer_idx], valid], 1)
            # (holding `old` keeps its id from being reused within this loop)
            stages[id(old)] = (old, k_pos, k_valid, additive_mask(order, k_pos, k_valid, x.dtype))
        _, k_pos, k_valid, mask = stages[id(old)]
        out = layer(x, attention_mask=mask, position_embeddings=rope, cache=cache, use_cache=True)
        x = out[0] if isinstance(out, tuple) else out
        cache.hidrop_positions[layer_idx], cache.hidrop_valid[layer_idx] = k_pos, k_valid
    return x


def slice_hidden(h, logits_to_keep):
    if isinstance(logits_to_keep, int):
        return h[:, -logits_to_keep:] if logits_to_keep else h
    return h[:, logits_to_keep]


def register_weight_names(cls, base: str):
    """Custom code gets none of a family's checkpoint renamings (legacy hub names, which our
    export writes) unless they are registered under its class name; `base`: the model type or
    class name transformers keeps them under."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:  # transformers 4.x renames through `_checkpoint_conversion_mapping`
        return
    mapping = cm.get_checkpoint_conversion_mapping(base)
    if mapping is not None:
        cm.register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)
