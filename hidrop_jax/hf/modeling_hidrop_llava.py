"""HiDrop inference for transformers' LLaVA: the trained schedule, and its compute saving, in PyTorch.

Self-contained with `hidrop_torch.py` (both import only torch and transformers): `hidrop_jax`
copies the two files verbatim into exported model directories, where `config.json` maps this one
through `auto_map`:

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    model.generate(**inputs)                     # runs the exported schedule (`config.hidrop`)
    model.set_hidrop_schedule(keep=[40, 4, 2, 1])   # change fields (validated)
    model.set_hidrop_schedule("vanilla")         # or run all vision tokens in every layer

The same directory loads as plain `LlavaForConditionalGeneration` (vanilla) without remote code.

HiDrop (late injection, the cuts, persistent positions, the exit) is `hidrop_torch`'s, exactly as
`hidrop_jax.model.forward_hidden`; here LLaVA's part: the projected CLIP features are the vision
tokens' hidden states, and a token's order is also its RoPE position (`position_ids`, default
cumsum(attention_mask) − 1, what `generate` passes).
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
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from .hidrop_torch import (HiDropSchedule, check_beams, check_query_index, decode, default_order,
                           keep_counts, prefill, register_weight_names, slice_hidden,
                           tokens_per_layer)


class HiDropLlavaConfig(LlavaConfig):
    """`LlavaConfig` plus `hidrop`: the schedule (fields as `hidrop_jax`'s `cfg.hidrop`; None or
    absent = vanilla). `model_type` stays "llava" so the directory also loads without this file."""

    model_type = "llava"
    hidrop: dict | None = None


class HiDropLlavaForConditionalGeneration(HiDropSchedule, LlavaForConditionalGeneration):
    """LLaVA running the HiDrop schedule of `config.hidrop` (vanilla when None)."""

    config_class = HiDropLlavaConfig

    # ------------------------------------------------------------------ schedule

    @property
    def n_vision(self) -> int:
        return int(self.config.image_seq_length)

    _hidrop_n_vision = n_vision

    def vision_tokens_per_layer(self) -> list:
        """Vision tokens each decoder layer holds for a sample with an image."""
        return tokens_per_layer(self.hidrop_schedule, self.config.text_config.num_hidden_layers,
                                self.n_vision)

    def generate(self, *args, **kwargs):
        check_beams(kwargs.get("generation_config") or self.generation_config, kwargs,
                    self.hidrop_schedule)
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
            position_ids = default_order(attention_mask)
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
            position_ids = default_order(attention_mask)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(input_ids.shape[0], -1)
        if use_cache is None:
            use_cache = self.config.text_config.use_cache if labels is None else False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        lm = self.model.language_model
        if cache is not None and getattr(cache, "hidrop_positions", None) is not None:
            # new tokens (text, even an image token id: as HF's LLaVA embeds it after the prefill)
            q = input_ids.shape[1]
            pos = position_ids[:, -q:]
            h = decode(lm, self._rotary, lm.embed_tokens(input_ids), pos, pos[..., None],
                       attention_mask[:, -q:].bool(), cache)
        else:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("cache already holds keys not written by a HiDrop prefill; pass a "
                                 "fresh cache (or none)")
            h = self._hidrop_prefill(sched, input_ids, pixel_values, attention_mask, position_ids,
                                     cache if use_cache else None, vision_feature_layer,
                                     vision_feature_select_strategy, image_sizes, hidrop_query_index,
                                     hidrop_query_mask)
        logits = self.lm_head(lm.norm(slice_hidden(h, logits_to_keep)))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.text_config.vocab_size, **kwargs)
        return LlavaCausalLMOutputWithPast(loss=loss, logits=logits,
                                           cache=cache if use_cache else None)

    def _hidrop_prefill(self, h, input_ids, pixel_values, attention_mask, position_ids, cache,
                        vision_feature_layer, vision_feature_select_strategy, image_sizes,
                        query_index, query_mask):
        """Final hidden states [B, L, D] (zeros where no token is left) under schedule `h`."""
        lm = self.model.language_model
        B, L = input_ids.shape
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
        vis = torch.where(is_img, is_img.long().cumsum(1) - 1, torch.full_like(input_ids, -1))
        query_mask = check_query_index(is_img, query_index, query_mask)
        keep = [torch.full((B,), k, dtype=torch.long) for k in keep_counts(h["keep"], self.n_vision)]
        out, self.hidrop_kept = prefill(lm, self._rotary, h, x, vis, position_ids,
                                        position_ids[..., None], attention_mask.bool(), keep, cache,
                                        query_index, query_mask)
        return out

    def _rotary(self, x, rot):
        """cos/sin for rotary positions rot [B, S, 1] (LLaVA: the order itself)."""
        return self.model.language_model.rotary_emb(x, position_ids=rot[..., 0])


register_weight_names(HiDropLlavaForConditionalGeneration, "llava")
