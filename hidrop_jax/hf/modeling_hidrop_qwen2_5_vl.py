"""HiDrop inference for transformers' Qwen2.5-VL: the trained schedule, and its saving, in PyTorch.

Self-contained with `hidrop_torch.py` (both import only torch and transformers): `hidrop_jax`
copies the two files verbatim into exported model directories, where `config.json` maps this one
through `auto_map`:

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    model.generate(**processor_outputs)          # runs the exported schedule (`config.hidrop`)
    model.set_hidrop_schedule(keep=[0.4, 10, 5, 1])  # change fields (validated)
    model.set_hidrop_schedule("vanilla")         # or run all vision tokens in every layer

The same directory loads as plain `Qwen2_5_VLForConditionalGeneration` (vanilla) without remote code.

HiDrop (late injection, the cuts, persistent positions, the exit) is `hidrop_torch`'s, exactly as
`hidrop_jax.model.forward_hidden` runs it for Qwen2.5-VL; here Qwen's part:
  * the vision tokens' hidden states are the merger's outputs (`get_image_features`);
  * order and rotation are separate: masks, causality and the scoring query row follow the order
    (cumsum(attention_mask) − 1), rotation follows M-RoPE's (t, h, w) rows from `get_rope_index`
    (text after an image resumes at start + max(h, w)); each kept vision token keeps its own
    3-D position, text positions are untouched;
  * decoding rotates a new token at its order + `rope_deltas` on all three rows, as HF does
    (`generate` passes [4, B, L] position_ids: the order, then the three rows);
  * a keep entry may be a fraction in (0, 1) of each sample's vision tokens (an image's token
    count follows its grid); counts must fit every sample's count;
  * image rows come from `input_ids == image_token_id` (`mm_token_type_ids`, when given, must
    agree; without it HF's own model silently falls back to 1-D positions, this one does not).
    Videos are refused under a schedule. Any number of images per sample; a cut keeps `keep[i]`
    of all the sample's vision tokens.
Query rows: at inference the last prompt (non-image, non-padding) token; `hidrop_query_index`
[B, Q] (columns of `input_ids`) with `hidrop_query_mask` gives training-style rows instead.

Logits have HF's shape [B, L, V]; at padding, and at a vision position whose token no longer
exists after the last layer (dropped or exited), they are 0. `model.hidrop_kept` holds, after each
prefill, the index (among the sample's vision tokens) of those kept at every cut, [B, most kept]
(−1: none). Greedy and sampling; beam search is refused.
"""

import torch
from transformers import DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

from .hidrop_torch import (HiDropSchedule, check_beams, check_query_index, decode, default_order,
                           keep_counts, prefill, register_weight_names, slice_hidden,
                           tokens_per_layer)


class HiDropQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """`Qwen2_5_VLConfig` plus `hidrop`: the schedule (fields as `hidrop_jax`'s `cfg.hidrop`; None
    or absent = vanilla). `model_type` stays "qwen2_5_vl" so the directory also loads without
    this file."""

    model_type = "qwen2_5_vl"
    hidrop: dict | None = None


class HiDropQwen2_5_VLForConditionalGeneration(HiDropSchedule, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL running the HiDrop schedule of `config.hidrop` (vanilla when None)."""

    config_class = HiDropQwen2_5_VLConfig

    # ------------------------------------------------------------------ schedule

    @property
    def _n_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    def vision_tokens_per_layer(self, n_vision: int) -> list:
        """Vision tokens each decoder layer holds for a sample with `n_vision` of them."""
        return tokens_per_layer(self.hidrop_schedule, self._n_layers, n_vision)

    def generate(self, *args, **kwargs):
        sched = self.hidrop_schedule
        check_beams(kwargs.get("generation_config") or self.generation_config, kwargs, sched)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if sched is not None and kwargs.get("mm_token_type_ids") is None and ids is not None:
            # HF builds 3-D positions only from mm_token_type_ids: derive it from input_ids
            kwargs["mm_token_type_ids"] = self._image_rows(ids).long()
        return super().generate(*args, **kwargs)

    # ------------------------------------------------------------------ forward

    def _image_rows(self, input_ids):
        return input_ids == self.config.image_token_id

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, pixel_values=None,
                pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                mm_token_type_ids=None, second_per_grid_ts=None, logits_to_keep=0,
                mm_encoder_outputs=None, hidrop_query_index=None, hidrop_query_mask=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        sched = self.hidrop_schedule
        if sched is None:
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids, second_per_grid_ts=second_per_grid_ts,
                logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        if input_ids is None:
            raise ValueError("input_ids = None is not supported under a HiDrop schedule (it finds "
                             "the vision tokens by image_token_id); pass input_ids")
        encoded = dict(mm_encoder_outputs or {})  # `generate` encodes the images before prefill
        if pixel_values_videos is not None or encoded.get("video") is not None:
            raise ValueError("videos are not supported under a HiDrop schedule; allowed: still "
                             "images (pixel_values + image_grid_thw), or set_hidrop_schedule('vanilla')")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if use_cache is None:
            use_cache = self.config.text_config.use_cache if labels is None else False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        lm = self.model.language_model
        if cache is not None and getattr(cache, "hidrop_positions", None) is not None:
            h = self._hidrop_decode(input_ids, attention_mask, position_ids, cache)
        else:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("cache already holds keys not written by a HiDrop prefill; pass a "
                                 "fresh cache (or none)")
            h = self._hidrop_prefill(sched, input_ids, attention_mask, position_ids, pixel_values,
                                     image_grid_thw, encoded.get("image"), mm_token_type_ids,
                                     cache if use_cache else None, hidrop_query_index,
                                     hidrop_query_mask)
        logits = self.lm_head(lm.norm(slice_hidden(h, logits_to_keep)))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.text_config.vocab_size, **kwargs)
        return MultimodalCausalLMOutputWithPast(loss=loss, logits=logits,
                                                cache=cache if use_cache else None)

    def _rotary(self, x, rot):
        """cos/sin for rotary positions rot [B, S, 3] (M-RoPE rows t, h, w)."""
        return self.model.language_model.rotary_emb(x, rot.permute(2, 0, 1))

    @staticmethod
    def _split_positions(position_ids, attention_mask):
        """(order [B, L], rotary rows [B, L, 3]) from HF's position_ids: [4, B, L] (`generate`:
        the order, then t, h, w), [3, B, L] (rows; order from the mask) or [B, L] (both)."""
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[0], position_ids[1:].permute(1, 2, 0)
        if position_ids.dim() == 3:
            return default_order(attention_mask)[:, -position_ids.shape[-1]:], position_ids.permute(1, 2, 0)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(attention_mask.shape[0], -1)
        return position_ids, position_ids[..., None].expand(-1, -1, 3)

    def _hidrop_prefill(self, h, input_ids, attention_mask, position_ids, pixel_values,
                        image_grid_thw, encoded, mm_token_type_ids, cache, query_index, query_mask):
        """Final hidden states [B, L, D] (zeros where no token is left) under schedule `h`."""
        lm = self.model.language_model
        B, L = input_ids.shape
        valid = attention_mask.bool()
        if bool((input_ids == self.config.video_token_id).logical_and(valid).any()):
            raise ValueError(f"input_ids contain video tokens (id {self.config.video_token_id}); "
                             "not supported under a HiDrop schedule")
        is_img = self._image_rows(input_ids) & valid
        if mm_token_type_ids is not None and not torch.equal((mm_token_type_ids == 1) & valid, is_img):
            raise ValueError("mm_token_type_ids (1 = image) disagrees with the image tokens "
                             f"(id {self.config.image_token_id}) of input_ids")
        counts = is_img.sum(1)
        x = lm.embed_tokens(input_ids)
        if counts.any():
            if encoded is None and (pixel_values is None or image_grid_thw is None):
                raise ValueError("input_ids contain image tokens but pixel_values or image_grid_thw is None")
            if encoded is None:
                encoded = self.model.get_image_features(pixel_values, image_grid_thw)
            feats = torch.cat(list(encoded.pooler_output))
            if feats.shape[0] != int(counts.sum()):
                raise ValueError(f"pixel_values / image_grid_thw give {feats.shape[0]} image features "
                                 f"for {int(counts.sum())} image tokens")
            x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))
        if position_ids is None:
            if counts.any() and image_grid_thw is None:
                raise ValueError("position_ids and image_grid_thw are None: M-RoPE positions need one")
            rows, deltas = self.model.get_rope_index(input_ids, is_img.long(), image_grid_thw,
                                                     attention_mask=attention_mask)
            order, rot = default_order(attention_mask), rows.permute(1, 2, 0)
        else:
            order, rot = self._split_positions(position_ids, attention_mask)
            top = torch.where(valid[..., None], rot, torch.full_like(rot, -1)).amax((1, 2))
            deltas = (top + 1 - valid.sum(1))[:, None]
        self.model.rope_deltas = deltas  # as HF's forward: a decode without positions uses it
        if cache is not None:
            cache.hidrop_rope_deltas = deltas
        vis = torch.where(is_img, is_img.long().cumsum(1) - 1, torch.full_like(input_ids, -1))
        query_mask = check_query_index(is_img, query_index, query_mask)
        keep = [torch.zeros(B, dtype=torch.long) for _ in h["keep"]]
        for i, n in enumerate(counts.tolist()):
            if n:
                try:
                    per = keep_counts(h["keep"], n)
                except ValueError as e:
                    raise ValueError(f"sample {i} ({n} vision tokens): {e}") from None
                for c, k in zip(keep, per):
                    c[i] = k
        out, self.hidrop_kept = prefill(lm, self._rotary, h, x, vis, order, rot, valid, keep, cache,
                                        query_index, query_mask)
        return out

    def _hidrop_decode(self, input_ids, attention_mask, position_ids, cache):
        """Hidden states [B, Q, D] of new text tokens against each layer's kept keys."""
        lm = self.model.language_model
        q = input_ids.shape[1]
        valid = attention_mask[:, -q:].bool()
        if position_ids is None:  # HF: order + rope_deltas on all three rows
            if attention_mask.shape[1] > q:
                order = default_order(attention_mask)[:, -q:]
            else:  # no mask over the whole sequence: continue after the cached tokens
                seen = torch.stack([torch.where(v, p, torch.full_like(p, -1)).amax(1)
                                    for p, v in zip(cache.hidrop_positions, cache.hidrop_valid)])
                order = seen.amax(0)[:, None] + 1 + torch.arange(q, device=input_ids.device)
            deltas = getattr(cache, "hidrop_rope_deltas", None)
            rot = (order + (0 if deltas is None else deltas.to(order.device)))[..., None].expand(-1, -1, 3)
        else:
            order, rot = self._split_positions(position_ids[..., -q:], attention_mask[:, -q:])
            if position_ids.dim() == 3 and position_ids.shape[0] == 3:  # rows only: order from the mask
                order = default_order(attention_mask)[:, -q:]
        return decode(lm, self._rotary, lm.embed_tokens(input_ids), order, rot, valid, cache)


register_weight_names(HiDropQwen2_5_VLForConditionalGeneration, "Qwen2_5_VLForConditionalGeneration")
