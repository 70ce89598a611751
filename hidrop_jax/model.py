"""LLaVA with HiDrop: the one place that wires vision ∥ text, injection, pruning stages and exit.

Native input (`Inputs`): a right-padded text stream with persistent positions, plus where each
sample's image slot starts and its pixels. In memory the stream is [text (T) | vision block];
causality comes from positions, so the vision block can sit at the end, shrink, and leave.

    pixels ─► CLIP (feature layer) ─► projector ─────────────────────────┐ (no text dependence)
    text ─► embed ─► layers [0, inject) ─► join ─► stage ─► cut ─► … ─► exit ─► layers ─► head
"""

from __future__ import annotations

import functools
import json
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hidrop_jax.batch import Inputs, last_prompt_row
from hidrop_jax.config import initializer_range, schedule_of
from hidrop_jax.families import family
from hidrop_jax.families.llava import vision_dims  # noqa: F401  (LLaVA's CLIP dims; importable here as before)
from hidrop_jax.hf.inputs import hf_to_inputs  # noqa: F401  (LLaVA's HF adapter; importable here as before)
from hidrop_jax.hidrop.select import score_vision, select
from hidrop_jax.layers.attention import resolve as resolve_attention
from hidrop_jax.layers.common import dense, slice_layers, stacked
from hidrop_jax.layers.llama import DecoderLayer, Embedder, RMSNorm, TextDims
from hidrop_jax.layers.rope import mrope_tables, rope_tables


def _dtype(m):
    return jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32


def text_dims(m) -> TextDims:
    t = m.text
    return TextDims(t.vocab_size, t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads,
                    t.head_dim, t.rms_norm_eps, t.rope_theta, _dtype(m), resolve_attention(m.get("attention_impl")),
                    initializer_range(t), t.get("qkv_bias", False))


def rope_for(m, positions):
    """cos/sin tables for rotary positions: [B, S] (1-D RoPE) or [3, B, S] (M-RoPE rows t, h, w)."""
    t = m.text
    if positions.ndim == 3:
        return mrope_tables(positions, t.head_dim, t.rope_theta, tuple(t.mrope_section))
    return rope_tables(positions, t.head_dim, t.rope_theta)


# ----------------------------------------------------------------------------- parameters

def _init_boxed(cfg, rng):
    m = cfg.model
    td = text_dims(m)
    r = jax.random.split(rng, 6)
    x = jnp.zeros((1, 1, td.hidden_size), jnp.float32)
    pos = jnp.zeros((1, 1), jnp.int32)
    rope = rope_tables(pos, td.head_dim, td.rope_theta)
    text = {
        "embed_tokens": Embedder(td.vocab_size, td.hidden_size, init_std=td.init_std).init(
            r[0], pos)["params"],
        "layers": stacked(DecoderLayer, m.text.num_layers)(td).init(
            r[1], x, rope, pos, pos == 0)["params"],
        "norm": RMSNorm(td.rms_norm_eps).init(r[2], x)["params"],
    }
    if not m.text.tie_word_embeddings:
        text["lm_head"] = dense(td.vocab_size, ("embed", "vocab"), use_bias=False, dtype=jnp.float32,
                                name="lm_head", init_std=td.init_std).init(r[3], x)["params"]
    return {**family(m).init_vision(m, r[4], r[5]), "text": text}


def init_params(cfg, rng, out_shardings=None):
    """Random float32 parameters (plain arrays; logical axes come from `param_axes`), created
    directly in `out_shardings` when given (see `sharding.sharded_init`)."""
    return jax.jit(lambda k: nn.unbox(_init_boxed(cfg, k)), out_shardings=out_shardings)(rng)


def abstract_params(cfg):
    """Shapes and dtypes only (`jax.eval_shape`): nothing is allocated."""
    return jax.eval_shape(lambda: nn.unbox(_init_boxed(cfg, jax.random.PRNGKey(0))))


def param_axes(cfg):
    """Logical axis names per parameter (a PartitionSpec tree over logical names)."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _init_boxed(cfg, jax.random.PRNGKey(0))))


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- pieces

def encode_image(m, params, pixels):
    """pixels [B, H, W, C] -> projected vision tokens [B, n_vision, D_text]. Depends on nothing
    textual, so XLA may run it beside the text-only layers ("parallel decoupling"). Each
    family takes its own pixel layout (Qwen2.5-VL: flattened patches [B, S, C·T·P·P])."""
    return family(m).encode_image(m, params, pixels)


def run_layers(m, layers, start: int, stop: int, x, rope, pos, valid, raw=None, *,
               return_kv: bool = False):
    """Decoder layers [start, stop) as one scan over the stacked parameters. `raw` = (k_raw,
    v_raw): layer `start`'s unrotated key/value projections of every token, computed elsewhere
    (either may be None; needs stop = start + 1). With `return_kv`: (x, (k, v)), each layer's
    rotated keys/values stacked [stop − start, B, S, K, H]."""
    stack = stacked(DecoderLayer, stop - start, remat=m.remat, unroll=m.scan_unroll)(
        text_dims(m), return_kv=return_kv)
    k_raw, v_raw = raw or (None, None)
    x, kv = stack.apply({"params": slice_layers(layers, start, stop)}, x, rope, pos, valid, None,
                        k_raw, v_raw)
    return (x, kv) if return_kv else x


def project_kv(m, layers, layer: int, x):
    """Layer `layer`'s unrotated (k_proj, v_proj) of x [B, S, D] (see `DecoderLayer.project_kv`)."""
    return DecoderLayer(text_dims(m)).apply({"params": jax.tree.map(lambda p: p[layer], layers)},
                                            x, method=DecoderLayer.project_kv)


def decode_layers(m, layers, start: int, stop: int, x, rope, pos, kv, k_pos, k_valid, index):
    """Decoder layers [start, stop) for new tokens x [B, Q, D] against their KV cache `kv`
    ((k, v), each [stop − start, B, S, K, H]); see `DecoderLayer.decode`. -> (x, updated kv)."""
    b = nn.broadcast
    stack = stacked(DecoderLayer, stop - start, unroll=m.scan_unroll, method="decode",
                    in_axes=(b, b, 0, b, b, b))(text_dims(m))
    return stack.apply({"params": slice_layers(layers, start, stop)}, x, rope, pos, kv, k_pos,
                       k_valid, index, method="decode")


def lm_logits(m, text_params, x):
    td = text_dims(m)
    h = RMSNorm(td.rms_norm_eps, td.dtype).apply({"params": text_params["norm"]}, x)
    if m.text.tie_word_embeddings:
        emb = Embedder(td.vocab_size, td.hidden_size, td.dtype)
        out = emb.apply({"params": text_params["embed_tokens"]}, h, method=Embedder.attend)
    else:
        out = dense(td.vocab_size, ("embed", "vocab"), use_bias=False, dtype=td.dtype,
                    name="lm_head").apply({"params": text_params["lm_head"]}, h)
    return out.astype(jnp.float32)


def stage_positions(s, inputs: Inputs, vis_idx, alive, n_tokens: int):
    """Text and vision positions for a stage holding `n_tokens` vision tokens.

    persistent: every token keeps its full-sequence position (the paper's choice).
    group:      text persistent; kept vision tokens renumbered contiguously from the slot.
    compacted:  PyramidDrop-style; vision renumbered and the text after it shifted back.
    """
    slot = inputs.image_slot[:, None]
    text_pos = inputs.text_pos
    if s.positions == "persistent":
        return text_pos, slot + vis_idx
    rank = jnp.cumsum(alive, axis=1) - 1 if s.selection == "mask" else jnp.arange(vis_idx.shape[1])[None]
    if s.positions == "compacted":
        after = inputs.has_image[:, None] & (text_pos > slot)
        text_pos = jnp.where(after, text_pos - (s.n_vision - n_tokens), text_pos)
    return text_pos, slot + rank


def stage_rope(s, inputs: Inputs, vis_idx, text_pos, vis_pos):
    """Rotary positions of a stage's text and vision rows: the order itself (LLaVA), or the
    family's own positions (M-RoPE [3, B, ·]) with each kept vision token keeping its own."""
    if inputs.text_rope is None:
        return text_pos, vis_pos
    if s.positions != "persistent":
        raise ValueError(f"hidrop.positions = {s.positions!r} is not defined for M-RoPE models "
                         "(a 2-D grid has no contiguous renumbering); allowed: 'persistent'")
    vis = jnp.take_along_axis(inputs.vision_rope, vis_idx[:, None], axis=2)
    return jnp.moveaxis(inputs.text_rope, 1, 0), jnp.moveaxis(vis, 1, 0)  # rows first: [3, B, ·]


# ----------------------------------------------------------------------------- forward

class StageKV(NamedTuple):
    """The keys/values one segment of `Schedule.segments()` computed: a generation cache."""
    k: jax.Array      # [L_s, B, S, K, H] rotated keys of the segment's L_s layers
    v: jax.Array      # [L_s, B, S, K, H]
    pos: jax.Array    # [B, S] the S tokens' positions (text stream first, then vision)
    valid: jax.Array  # [B, S] bool


def forward(cfg, params, inputs: Inputs, *, vision=None, return_aux: bool = False):
    """Logits [B, T, V] float32 for the text stream, under `cfg.hidrop`'s schedule.

    vision: optional projected image tokens [B, N, D] from `encode_image`, computed elsewhere (an
    image reused across prompts); `inputs.pixels` is then not read.
    aux (if asked): `kept` = per cut the original vision indices kept [B, k]; `stage_text` = the
    text stream's hidden state after each segment.
    """
    x, aux = forward_hidden(cfg, params, inputs, vision=vision)
    logits = lm_logits(cfg.model, params["text"], x)
    return (logits, aux) if return_aux else logits


def forward_hidden(cfg, params, inputs: Inputs, *, vision=None, collect_kv: bool = False):
    """(text stream's final hidden state [B, T, D] before the final norm, aux): `forward`
    without the head. aux as in `forward`; with `collect_kv`, also `kv` = one `StageKV` per
    segment of `Schedule.segments()` (what every layer attended to: prefill for generation).
    """
    m = cfg.model
    s = schedule_of(cfg)
    td = text_dims(m)
    layers = params["text"]["layers"]
    b, T = inputs.text_ids.shape
    x = Embedder(td.vocab_size, td.hidden_size, td.dtype).apply(
        {"params": params["text"]["embed_tokens"]}, inputs.text_ids)

    vis_kv = None
    if vision is None and inputs.pixels is not None:
        vision = encode_image(m, params, inputs.pixels)
    if vision is not None:
        # Parallel decoupling: the vision tower, the projector and the injection layer's K/V of
        # the vision block need no text, so they form a branch XLA may schedule beside the
        # text-only layers; the injection layer then projects only the text rows.
        vision = vision.astype(x.dtype)
        vis_kv = project_kv(m, layers, s.inject_layer, vision)
    vis_idx = jnp.broadcast_to(jnp.arange(s.n_vision, dtype=jnp.int32), (b, s.n_vision))
    alive = jnp.broadcast_to(inputs.has_image[:, None], (b, s.n_vision))
    if inputs.vision_valid is not None:  # dead slots of a smaller image bucket: never alive
        alive = alive & inputs.vision_valid
    live = alive  # the slots that may ever be alive (a cut's extra picks among dead stay dead)
    if inputs.query_idx is None:
        q_idx, q_valid = last_prompt_row(inputs)
    else:
        q_idx, q_valid = inputs.query_idx, inputs.query_valid
    aux = {"kept": [], "stage_text": []} | ({"kv": []} if collect_kv else {})
    in_stream, raw = False, None
    for a, stop, n_tokens in s.segments():
        if vision is not None and a == s.inject_layer:
            raw = tuple(jnp.concatenate(p, axis=1) for p in zip(project_kv(m, layers, a, x), vis_kv))
            x, in_stream = jnp.concatenate([x, vision], axis=1), True
        if in_stream and a == s.exit:
            x, in_stream = x[:, :T], False
        text_pos, vis_pos = stage_positions(s, inputs, vis_idx, alive, n_tokens if in_stream else 0)
        text_rot, vis_rot = stage_rope(s, inputs, vis_idx, text_pos, vis_pos)
        if in_stream:
            pos = jnp.concatenate([text_pos, vis_pos], axis=1)
            rot = jnp.concatenate([text_rot, vis_rot], axis=-1)
            valid = jnp.concatenate([inputs.text_valid, alive], axis=1)
        else:
            pos, rot, valid = text_pos, text_rot, inputs.text_valid
        rope = rope_for(m, rot)
        kv = []

        def run(x, start, stop, raw=None):
            out = run_layers(m, layers, start, stop, x, rope, pos, valid, raw, return_kv=collect_kv)
            x, kv_ = out if collect_kv else (out, None)
            kv.append(kv_)
            return x

        if raw is not None:  # the injection layer / the first after a cut: projections done
            x, a, raw = run(x, a, a + 1, raw), a + 1, None
        if stop > a:
            x = run(x, a, stop)
        if collect_kv:
            aux["kv"].append(StageKV(*(jnp.concatenate([c[i] for c in kv]) for i in (0, 1)),
                                     pos, valid))
        aux["stage_text"].append(x[:, :T])
        if in_stream and stop - 1 in s.prune_after:
            k = s.keep[s.prune_after.index(stop - 1)]
            next_layer = jax.tree.map(lambda p: p[stop], layers)
            scores, k_raw = score_vision(td, next_layer, x, rope, pos, valid, q_idx, q_valid, T)
            idx, gate = select(scores, alive, k, s.selection, s.temperature)
            x_vis = x[:, T:]
            aux["kept"].append(jnp.take_along_axis(vis_idx, idx, axis=1))
            if s.selection == "mask":  # keep every slot, switch the dropped ones off as keys
                rows = jnp.arange(b)[:, None]
                alive = jnp.zeros_like(alive).at[rows, idx].set(True) & live
                g = jnp.ones(alive.shape, gate.dtype).at[rows, idx].set(gate)
            else:
                x_vis = jnp.take_along_axis(x_vis, idx[..., None], axis=1)
                k_vis = jnp.take_along_axis(k_raw[:, T:], idx[..., None], axis=1)
                k_raw = jnp.concatenate([k_raw[:, :T], k_vis], axis=1)
                vis_idx = jnp.take_along_axis(vis_idx, idx, axis=1)
                alive = jnp.take_along_axis(alive, idx, axis=1)
                g = gate
            x = jnp.concatenate([x[:, :T], x_vis * g[..., None].astype(x.dtype)], axis=1)
            raw = (k_raw, None)  # the next layer reuses the keys scoring computed
    return x[:, :T], aux


# ----------------------------------------------------------------------------- HF-style input

@functools.lru_cache(maxsize=16)
def _jitted_forward(cfg_json: str):
    import ml_collections
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    return jax.jit(lambda p, x: forward(cfg, p, x))


def forward_hf(cfg, params, input_ids, pixel_values=None, attention_mask=None, **processor_outputs):
    """Float32 logits [B, L − n_image_tokens, V] for the non-image positions of `input_ids`, in
    order (pads included, so they align with the input), under `cfg.hidrop` in inference mode
    (query row = last non-padding token). The family's `hf_to_inputs` says which layouts it
    accepts (`families.llava.hf_to_inputs`); Qwen2.5-VL also takes the processor's
    `image_grid_thw` and `mm_token_type_ids` (`families.qwen2_5_vl.hf_to_inputs`), and its image
    grid sets the compiled shape."""
    inputs, _, m = family(cfg.model).hf_to_inputs(cfg.model, input_ids, pixel_values, attention_mask,
                                                  **processor_outputs)
    if m is not cfg.model:  # another grid: another static shape
        cfg = cfg.copy_and_resolve_references()
        cfg.model = m
    return _jitted_forward(cfg.to_json())(params, inputs)
