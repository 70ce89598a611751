"""HiDrop inference for transformers' LLaVA: the trained schedule, and its compute saving, in PyTorch.

Self-contained (imports only torch and transformers): `hidrop_jax` copies this file verbatim into
exported model directories, where `config.json` maps it through `auto_map`:

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    model.generate(**inputs)                     # runs the exported schedule (`config.hidrop`)
    model.set_hidrop_schedule(keep=[40, 4, 2, 1])   # change fields (validated)
    model.set_hidrop_schedule("vanilla")         # or run all vision tokens in every layer

The same directory loads as plain `LlavaForConditionalGeneration` (vanilla) without remote code.

HiDrop (all layer indices 0-based), exactly as `hidrop_jax.model.forward_hidden`:
  * late injection: layers [0, inject_layer) see the text tokens only; vision tokens join at
    inject_layer (their hidden state is the projected image feature);
  * cuts: after each layer in `prune_after`, keep `keep[i]` vision tokens, scored by the next
    layer's input RMSNorm + q/k projections + RoPE: attention probabilities (causal, fp32 softmax)
    of the query rows over all present keys, mean over heads, vision columns, mean over query
    rows; hard top-k (ties to the earlier token), kept tokens stay in their original order;
  * persistent positions: every token keeps the RoPE position it has in the full sequence
    (`position_ids`, default cumsum(attention_mask) − 1, what `generate` passes);
  * exit: from `exit_layer` on no vision token is left.
Query rows: at inference the last prompt (non-image, non-padding) token; `hidrop_query_index`
[B, Q] (columns of `input_ids`) with `hidrop_query_mask` gives training-style rows instead.

Generation with HF's cache: prefill prunes once; each layer's `DynamicCache` entry holds the keys
that layer kept (a per-layer length), and decoded tokens attend, per layer, to exactly those plus
the tokens generated so far, at their full-sequence positions (kept on the cache as
`cache.hidrop_positions` / `cache.hidrop_valid`). Greedy and sampling; beam search is refused.

Logits have HF's shape [B, L, V]; at padding, and at a vision position whose token no longer
exists after the last layer (dropped or exited), they are 0. `model.hidrop_kept` holds, after each prefill, the original
index (within its image) of the vision tokens kept at every cut, [B, keep[i]] (−1: no image).
"""


import torch
from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

FIELDS = ("name", "inject_layer", "prune_after", "keep", "exit_layer", "selection", "positions",
          "temperature")
SELECTIONS = ("hard", "relaxed", "mask")  # training-time choices; inference is hard top-k for all


def _bad(field, value, allowed):
    raise ValueError(f"hidrop.{field} = {value!r} is invalid; allowed: {allowed}")


def _int(field, value):
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(field, value, "an int")
    return value


def validate_schedule(schedule, num_layers: int, n_vision: int):
    """The normalised schedule dict, or None for vanilla. Fails naming the field, the value and
    what is allowed (the same rules as `hidrop_jax.hidrop.schedule.validate`)."""
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
    keep = [_int(f"keep[{i}]", k) for i, k in enumerate(h.get("keep") or ())]
    if len(keep) != len(prune):
        _bad("keep", keep, f"one count per prune_after layer ({len(prune)} values)")
    prev = inject - 1
    for i, p in enumerate(prune):
        if not (prev < p and inject <= p and p + 1 < ex):
            _bad(f"prune_after[{i}]", p, f"strictly increasing ints in [{max(prev + 1, inject)}, "
                                         f"{ex - 2}] (from inject_layer={inject}, at least one layer before exit={ex})")
        prev = p
    avail = n_vision
    for i, k in enumerate(keep):
        limit = avail if i == 0 else avail - 1
        if not 1 <= k <= limit:
            _bad(f"keep[{i}]", k, f"an int in [1, {limit}] (strictly decreasing, at most the {avail} "
                                  "tokens available)")
        avail = k
    h.update(inject_layer=inject, prune_after=prune, keep=keep,
             exit_layer=None if ex == L else ex)
    if inject == 0 and not prune and ex == L:
        return None
    return h


class HiDropLlavaConfig(LlavaConfig):
    """`LlavaConfig` plus `hidrop`: the schedule (fields as `hidrop_jax`'s `cfg.hidrop`; None or
    absent = vanilla). `model_type` stays "llava" so the directory also loads without this file."""

    model_type = "llava"
    hidrop: dict | None = None


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


def _additive_mask(q_pos, k_pos, k_valid, dtype):
    """[B, 1, Q, S] 0 / dtype-min: a key is seen when valid and not after the query (positions)."""
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class _Tokens:
    """The tokens a layer holds, in original order: hidden states and per-slot bookkeeping."""

    def __init__(self, h, src, pos, valid, vis):
        self.h, self.src, self.pos, self.valid, self.vis = h, src, pos, valid, vis
        self._mask = None

    def mask(self):
        """The layers' attention mask over these tokens (built once per stage)."""
        if self._mask is None:
            self._mask = _additive_mask(self.pos, self.pos, self.valid, self.h.dtype)
        return self._mask

    def select(self, keep):
        order, ok = _compact(keep)
        return _Tokens(_take(self.h, order), _take(self.src, order).masked_fill(~ok, -1),
                       _take(self.pos, order), _take(self.valid, order) & ok,
                       _take(self.vis, order).masked_fill(~ok, -1))


class HiDropLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA running the HiDrop schedule of `config.hidrop` (vanilla when None)."""

    config_class = HiDropLlavaConfig

    def __init__(self, config):
        super().__init__(config)
        self.hidrop_kept = None
        self.set_hidrop_schedule(getattr(config, "hidrop", None))

    # ------------------------------------------------------------------ schedule

    @property
    def n_vision(self) -> int:
        return int(self.config.image_seq_length)

    def set_hidrop_schedule(self, schedule=None, **fields):
        """Sets (and validates) `config.hidrop`. `schedule`: a dict of fields, None or "vanilla";
        `fields` override single fields of the current (or given) schedule, e.g.
        `set_hidrop_schedule(exit_layer=None)`."""
        if schedule is None and fields:
            schedule = dict(getattr(self.config, "hidrop", None) or {})
        if fields:
            schedule = dict({} if schedule in (None, "vanilla") else schedule, **fields)
        h = validate_schedule(schedule, self.config.text_config.num_hidden_layers, self.n_vision)
        self.config.hidrop = h
        return h

    @property
    def hidrop_schedule(self):
        """The validated schedule in force (None = vanilla); `config.hidrop` may be edited directly."""
        return validate_schedule(getattr(self.config, "hidrop", None),
                                 self.config.text_config.num_hidden_layers, self.n_vision)

    def vision_tokens_per_layer(self) -> list:
        """Vision tokens each decoder layer holds for a sample with an image."""
        h, L = self.hidrop_schedule, self.config.text_config.num_hidden_layers
        if h is None:
            return [self.n_vision] * L
        ex = L if h["exit_layer"] is None else h["exit_layer"]
        out, n = [], 0
        for layer in range(L):
            n = self.n_vision if layer == h["inject_layer"] else (0 if layer == ex else n)
            out.append(n)
            if layer in h["prune_after"]:
                n = h["keep"][h["prune_after"].index(layer)]
        return out

    def generate(self, *args, **kwargs):
        gc = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams") or getattr(gc, "num_beams", 1) or 1
        if beams > 1 and self.hidrop_schedule is not None:
            raise ValueError(f"num_beams = {beams} is not supported under a HiDrop schedule (its "
                             "per-layer cache positions are not reordered); allowed: 1 (greedy or "
                             "sampling), or set_hidrop_schedule('vanilla')")
        return super().generate(*args, **kwargs)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                cache=None, inputs_embeds=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, labels=None, logits_to_keep=0,
                image_sizes=None, hidrop_query_index=None, hidrop_query_mask=None,
                past_key_values=None, use_cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # full-sequence positions of a padded batch (HF's default would be 0..L-1 per row)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if cache is not None and cache.get_seq_length() > 0 and input_ids is not None:
                position_ids = position_ids[:, -input_ids.shape[1]:]
        sched = self.hidrop_schedule
        if sched is None:
            if use_cache is not None:
                kwargs["use_cache"] = use_cache
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, labels=labels,
                logits_to_keep=logits_to_keep, image_sizes=image_sizes, **kwargs)
        if input_ids is None:
            raise ValueError("input_ids = None is not supported under a HiDrop schedule (it finds "
                             "the vision tokens by image_token_id); pass input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(input_ids.shape[0], -1)
        if use_cache is None:
            use_cache = self.config.text_config.use_cache if labels is None else False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and getattr(cache, "hidrop_positions", None) is not None:
            h = self._hidrop_decode(input_ids, attention_mask, position_ids, cache)
        else:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("cache already holds keys not written by a HiDrop prefill; pass a "
                                 "fresh cache (or none)")
            h = self._hidrop_prefill(sched, input_ids, pixel_values, attention_mask, position_ids,
                              cache if use_cache else None, vision_feature_layer,
                              vision_feature_select_strategy, image_sizes, hidrop_query_index,
                              hidrop_query_mask)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(self.model.language_model.norm(h))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.text_config.vocab_size, **kwargs)
        return LlavaCausalLMOutputWithPast(loss=loss, logits=logits,
                                           cache=cache if use_cache else None)

    def _hidrop_run_layer(self, layer_idx, tokens, rope, cache):
        layer = self.model.language_model.layers[layer_idx]
        out = layer(tokens.h, attention_mask=tokens.mask(), position_embeddings=rope, cache=cache,
                    use_cache=cache is not None)
        tokens.h = out[0] if isinstance(out, tuple) else out
        if cache is not None:
            cache.hidrop_positions.append(tokens.pos)
            cache.hidrop_valid.append(tokens.valid)

    def _hidrop_prefill(self, h, input_ids, pixel_values, attention_mask, position_ids, cache,
                 vision_feature_layer, vision_feature_select_strategy, image_sizes, query_index,
                 query_mask):
        """Final hidden states [B, L, D] (zeros where no token is left) under schedule `h`."""
        lm = self.model.language_model
        B, L = input_ids.shape
        dev = input_ids.device
        is_img = input_ids == self.config.image_token_id
        counts = is_img.sum(1)
        for i, c in enumerate(counts.tolist()):
            if c not in (0, self.n_vision):
                raise ValueError(f"sample {i} has {c} image tokens (id {self.config.image_token_id}); "
                                 f"allowed: 0 or image_seq_length={self.n_vision} (one image per sample)")
        x = lm.embed_tokens(input_ids)
        if pixel_values is not None and counts.any():
            feats = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=(vision_feature_layer if vision_feature_layer is not None
                                      else self.config.vision_feature_layer),
                vision_feature_select_strategy=(vision_feature_select_strategy
                                                if vision_feature_select_strategy is not None
                                                else self.config.vision_feature_select_strategy),
                **({"image_sizes": image_sizes} if image_sizes is not None else {}))
            feats = getattr(feats, "pooler_output", feats)
            feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)
            if feats.shape[0] != int(counts.sum()):
                raise ValueError(f"pixel_values give {feats.shape[0]} image features for "
                                 f"{int(counts.sum())} image tokens")
            x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))
        elif counts.any():
            raise ValueError("input_ids contain image tokens but pixel_values is None")
        has_vision = bool(counts.any())
        vis = torch.where(is_img, is_img.long().cumsum(1) - 1, torch.full_like(input_ids, -1))
        full = _Tokens(x, torch.arange(L, device=dev)[None].expand(B, L), position_ids,
                       attention_mask.bool(), vis)
        if query_index is not None:
            query_mask = (torch.ones_like(query_index, dtype=torch.bool) if query_mask is None
                          else query_mask.bool())
            if bool((is_img.gather(1, query_index.clamp(0, L - 1)) & query_mask).any()):
                raise ValueError("hidrop_query_index points at an image token; allowed: text columns")
        n_layers = self.config.text_config.num_hidden_layers
        ex = n_layers if h["exit_layer"] is None else h["exit_layer"]
        # padding never enters: every row holds only its real tokens (a ragged batch pads the
        # shorter rows of each layer with empty slots)
        tokens = full.select(full.valid & ((vis < 0) if has_vision and h["inject_layer"] > 0 else True))
        injected = has_vision and h["inject_layer"] == 0
        rope = lm.rotary_emb(x, position_ids=tokens.pos)
        if cache is not None:
            cache.hidrop_positions, cache.hidrop_valid = [], []
        self.hidrop_kept = []
        for layer_idx in range(n_layers):
            if has_vision and layer_idx == h["inject_layer"] and not injected:
                buf = torch.cat([x, x.new_zeros(B, 1, x.shape[-1])], 1)  # column L: empty slots
                src = tokens.src.masked_fill(tokens.src < 0, L)
                buf = buf.scatter(1, src[..., None].expand_as(tokens.h), tokens.h)
                tokens = _Tokens(buf[:, :L], full.src, full.pos, full.valid, full.vis).select(full.valid)
                injected = True
                rope = lm.rotary_emb(x, position_ids=tokens.pos)
            if injected and layer_idx == ex:
                tokens, injected = tokens.select((tokens.vis < 0) & (tokens.src >= 0)), False
                rope = lm.rotary_emb(x, position_ids=tokens.pos)
            self._hidrop_run_layer(layer_idx, tokens, rope, cache)
            if injected and layer_idx in h["prune_after"]:
                k = h["keep"][h["prune_after"].index(layer_idx)]
                q_idx, q_ok = self._hidrop_query_rows(tokens, query_index, query_mask, L)
                scores = _score_vision(lm.layers[layer_idx + 1], tokens, rope, q_idx, q_ok)
                keep = (tokens.vis < 0) & (tokens.src >= 0)
                scores = scores.masked_fill(tokens.vis < 0, float("-inf"))
                order = torch.sort(scores, dim=1, descending=True, stable=True).indices
                rank = torch.empty_like(order).scatter_(
                    1, order, torch.arange(order.shape[1], device=dev)[None].expand_as(order))
                tokens = tokens.select(keep | ((tokens.vis >= 0) & (rank < k)))
                big = torch.iinfo(tokens.vis.dtype).max
                kept = torch.sort(tokens.vis.masked_fill(tokens.vis < 0, big), dim=1).values[:, :k]
                self.hidrop_kept.append(kept.masked_fill(kept == big, -1))
                rope = lm.rotary_emb(x, position_ids=tokens.pos)
        out = torch.zeros(B, L + 1, x.shape[-1], dtype=tokens.h.dtype, device=dev)
        src = tokens.src.masked_fill(tokens.src < 0, L)
        return out.scatter(1, src[..., None].expand_as(tokens.h), tokens.h)[:, :L]

    @staticmethod
    def _hidrop_query_rows(tokens, query_index, query_mask, L):
        """(slot indices [B, Q], valid [B, Q]) of the scoring query rows in `tokens`."""
        text = (tokens.vis < 0) & tokens.valid
        if query_index is None:  # the last prompt token: the valid text token with the largest position
            last = torch.where(text, tokens.pos, torch.full_like(tokens.pos, -1)).argmax(1)
            return last[:, None], text.any(1, keepdim=True)
        inv = torch.full((tokens.src.shape[0], L + 1), 0, dtype=torch.long, device=tokens.src.device)
        src = tokens.src.masked_fill(tokens.src < 0, L)
        slots = torch.arange(src.shape[1], device=src.device)[None].expand_as(src)
        inv.scatter_(1, src, slots)
        return inv.gather(1, query_index.clamp(0, L - 1)), query_mask

    def _hidrop_decode(self, input_ids, attention_mask, position_ids, cache):
        """Hidden states [B, Q, D] of new tokens (text, even an image token id: as HF's LLaVA
        embeds it after the prefill) against each layer's kept keys."""
        lm = self.model.language_model
        q = input_ids.shape[1]
        x = lm.embed_tokens(input_ids)
        pos = position_ids[:, -q:]
        valid = attention_mask[:, -q:].bool()
        rope = lm.rotary_emb(x, position_ids=pos)
        stages = {}  # the layers of a stage share their bookkeeping tensors: extend them once
        for layer_idx, layer in enumerate(lm.layers):
            old = cache.hidrop_positions[layer_idx]
            if id(old) not in stages:
                k_pos = torch.cat([old, pos], 1)
                k_valid = torch.cat([cache.hidrop_valid[layer_idx], valid], 1)
                # (holding `old` keeps its id from being reused within this loop)
                stages[id(old)] = (old, k_pos, k_valid, _additive_mask(pos, k_pos, k_valid, x.dtype))
            _, k_pos, k_valid, mask = stages[id(old)]
            out = layer(x, attention_mask=mask, position_embeddings=rope, cache=cache, use_cache=True)
            x = out[0] if isinstance(out, tuple) else out
            cache.hidrop_positions[layer_idx], cache.hidrop_valid[layer_idx] = k_pos, k_valid
        return x


def _score_vision(layer, tokens, rope, q_idx, q_ok):
    """[B, S]: per slot, the attention the query rows pay it in `layer` (fp32 softmax over the
    slots they may see, mean over heads, mean over the valid query rows)."""
    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(tokens.h)
    B, S, _ = x.shape
    Q = q_idx.shape[1]
    cos, sin = rope
    q = attn.q_proj(_take(x, q_idx)).view(B, Q, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, _take(cos, q_idx), _take(sin, q_idx))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / hd ** 0.5  # [B, H, Q, S]
    q_pos = tokens.pos.gather(1, q_idx)
    allowed = (tokens.pos[:, None, :] <= q_pos[:, :, None]) & tokens.valid[:, None, :]
    allowed = allowed | ~q_ok[:, :, None]  # an absent query row: any finite row, weighted 0
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).mean(1)
    w = q_ok.float()
    return (probs * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)


def _register_weight_names():
    """Custom code gets none of LLaVA's checkpoint renamings (legacy hub names such as
    `language_model.lm_head.weight`, which our export writes) unless registered by class name."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:  # transformers 4.x renames through `_checkpoint_conversion_mapping`
        return
    mapping = cm.get_checkpoint_conversion_mapping("llava")
    if mapping is not None:
        cm.register_checkpoint_conversion_mapping(HiDropLlavaForConditionalGeneration.__name__,
                                                  mapping, overwrite=True)


_register_weight_names()
