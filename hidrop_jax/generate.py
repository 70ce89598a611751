"""Generation under a HiDrop schedule: prune once at prefill, one static KV cache per stage.

Prefill is `model.forward_hidden` (late injection, pruning scored by the last prompt token, early
exit), which also hands back every layer's keys/values. Each segment of `Schedule.segments()`
(a stage: layers that hold the same tokens) keeps its own cache of static length

    S_s + max_new_tokens,  S_s = T text slots (+ the k_s vision tokens alive in that stage)

so layers before injection and after exit cache T + max_new slots, a stage with k_s vision
tokens T + k_s + max_new. Each new token gets the next persistent full-sequence position (1 +
the largest prompt position, the image's reserved slots included, per sample) and attends, layer
by layer, to exactly the tokens that layer kept at prefill plus the tokens generated so far.
Causality comes from positions, so one memory slot per step serves a ragged batch.

    out = generate(cfg, params, inputs, max_new_tokens=32, eos_id=2)
    out["tokens"] [B, max_new] (pad after EOS), out["lengths"] [B] (EOS counted), out["kept"]

The whole generation (prefill + a `lax.while_loop` over decode steps that stops when every sample
has emitted EOS) is one jitted function: one compile per (config, batch shape, max_new_tokens,
greedy/sampling); prompts, temperature, top_p, EOS/pad ids and the PRNG key are traced.

CLI (offline):

    python -m hidrop_jax.generate --hf HF_DIR --image cat.jpg --prompt "What is this?"
    python -m hidrop_jax.generate --workdir CKPT_DIR --image x.jpg --prompt "..." --schedule tok64

`--hf`: a Hugging Face LLaVA directory (tokenizer through `AutoProcessor`/`AutoTokenizer` from
the same directory; the schedule from its `hidrop_schedule.json` if present, else vanilla).
`--workdir`: an `import-hf` checkpoint (config.json + params/), or a training run's workdir
(its latest step, or `--step`); the schedule comes from its config unless `--schedule`. Tokenizer:
`--tokenizer`, else the config's `data.tokenizer`, else `DIR/tokenizer/`, else DIR itself if it
holds tokenizer files. The image is preprocessed as LLaVA-1.5 does
(`hidrop_jax.data.image.preprocess`: pad to a square with the CLIP mean colour, resize bicubic
to the vision tower's size — so an image of any size is accepted and resized —, CLIP mean/std).
The prompt is wrapped in a chat template (`--template v1`, LLaVA-1.5's and the default unless
the run's config names another; `plain`; or `none` for the raw text with the image first).
A prompt whose positions plus max_new_tokens exceed `model.text.max_position_embeddings` fails
naming that limit.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hidrop_jax import checks, cli
from hidrop_jax.config import apply_schedule, n_vision_tokens, schedule_of
from hidrop_jax.hidrop.schedule import PRESETS
from hidrop_jax.layers.llama import Embedder
from hidrop_jax.layers.rope import rope_tables
from hidrop_jax.batch import Inputs, last_prompt_row
from hidrop_jax.checkpoint import find_tokenizer, open_run
from hidrop_jax.families import family
from hidrop_jax.model import (StageKV, stage_positions, decode_layers, forward_hidden, lm_logits,
                              rope_for, text_dims)
from hidrop_jax.data import templates


class State(NamedTuple):
    """Decoding state (a pytree; every shape static)."""
    caches: tuple     # one StageKV per segment; slots [S_s, S_s + max_new) are for new tokens
    write: tuple      # per segment, [] int32: the slot the next token's k/v go to
    offset: tuple     # per segment, [B] int32: full-sequence position − the stage's position of
                      # a new token (0 unless positions='compacted', which renumbers)
    next_pos: jax.Array  # [B] int32 full-sequence position of the next token fed
    rope_delta: Optional[jax.Array] = None  # [B] M-RoPE: a new token rotates by next_pos + delta
                                            # on all rows (HF's rope_deltas); None: by next_pos


def rope_delta(inputs: Inputs, next_pos):
    """[B] (largest rotary position of the prompt + 1) − next_pos, or None without M-RoPE."""
    if inputs.text_rope is None:
        return None
    top = jnp.max(jnp.where(inputs.text_valid[:, None], inputs.text_rope, -1), axis=(1, 2))
    vis_rope = inputs.vision_rope
    if inputs.vision_valid is not None:  # dead slots' rotary positions are arbitrary
        vis_rope = jnp.where(inputs.vision_valid[:, None], vis_rope, -1)
    vis = jnp.max(vis_rope, axis=(1, 2))
    top = jnp.maximum(top, jnp.where(inputs.has_image, vis, -1))
    return (top + 1 - next_pos).astype(jnp.int32)


def next_position(inputs: Inputs, n_vision: int):
    """[B] 1 + the largest position of the prompt: its valid text tokens and, for a sample with
    an image, its n_vision reserved slots."""
    last_text = jnp.max(jnp.where(inputs.text_valid, inputs.text_pos, -1), axis=1)
    last_img = jnp.where(inputs.has_image, inputs.image_slot + n_vision - 1, -1)
    return (jnp.maximum(last_text, last_img) + 1).astype(jnp.int32)


def prefill(cfg, params, inputs: Inputs, max_new_tokens: int):
    """-> (logits [B, V] float32 of the token after the prompt, State, kept).

    Pruning is scored with the last prompt token as the only query row (`inputs.query_idx` is
    ignored); `kept` = per cut the original vision indices kept [B, k] (as `forward`'s aux).
    """
    m = cfg.model
    s = schedule_of(cfg)
    q_idx, q_valid = last_prompt_row(inputs)
    inputs = inputs._replace(query_idx=q_idx, query_valid=q_valid)
    x, aux = forward_hidden(cfg, params, inputs, collect_kv=True)
    h = jnp.take_along_axis(x, q_idx[..., None], axis=1)
    logits = lm_logits(m, params["text"], h)[:, 0]
    next_pos = next_position(inputs, s.n_vision)
    b = next_pos.shape[0]
    dummy_idx, dummy_alive = jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), bool)
    caches, write, offset = [], [], []
    for (_, _, n), c in zip(s.segments(), aux["kv"]):
        grow = lambda a, axis: jnp.pad(a, [(0, max_new_tokens if i == axis else 0)
                                           for i in range(a.ndim)])
        caches.append(StageKV(grow(c.k, 2), grow(c.v, 2), grow(c.pos, 1), grow(c.valid, 1)))
        write.append(jnp.int32(c.pos.shape[1]))
        n_s = n if inputs.pixels is not None else 0  # as `forward_hidden` numbers this stage
        stage_pos = stage_positions(s, inputs._replace(text_pos=next_pos[:, None]), dummy_idx,
                               dummy_alive, n_s)[0][:, 0]
        offset.append(next_pos - stage_pos)
    return (logits, State(tuple(caches), tuple(write), tuple(offset), next_pos,
                          rope_delta(inputs, next_pos)), aux["kept"])


def decode_step(cfg, params, state: State, tokens):
    """Feeds tokens [B] at `state.next_pos` -> (logits [B, V] float32 of the token after them,
    the next State). Every layer attends to its own stage's cache."""
    m = cfg.model
    s = schedule_of(cfg)
    td = text_dims(m)
    layers = params["text"]["layers"]
    x = Embedder(td.vocab_size, td.hidden_size, td.dtype).apply(
        {"params": params["text"]["embed_tokens"]}, tokens[:, None])
    caches = []
    for (a, stop, _), c, w, off in zip(s.segments(), state.caches, state.write, state.offset):
        pos = (state.next_pos - off)[:, None]
        k_pos = lax.dynamic_update_slice_in_dim(c.pos, pos.astype(c.pos.dtype), w, axis=1)
        k_valid = lax.dynamic_update_slice_in_dim(c.valid, jnp.ones_like(pos, bool), w, axis=1)
        if state.rope_delta is None:
            rope = rope_tables(pos, td.head_dim, td.rope_theta)
        else:
            rot = (state.next_pos + state.rope_delta)[:, None]
            rope = rope_for(m, jnp.broadcast_to(rot, (3,) + rot.shape))
        x, (k, v) = decode_layers(m, layers, a, stop, x, rope, pos, (c.k, c.v), k_pos, k_valid, w)
        caches.append(StageKV(k, v, k_pos, k_valid))
    logits = lm_logits(m, params["text"], x)[:, 0]
    return logits, State(tuple(caches), tuple(w + 1 for w in state.write), state.offset,
                         state.next_pos + 1, state.rope_delta)


def sample_token(logits, key, temperature, top_p):
    """Temperature + nucleus (top-p) sampling from logits [B, V] -> [B] int32. The smallest set
    of most likely tokens whose probability reaches `top_p` is kept (the best one always)."""
    logits = logits.astype(jnp.float32) / temperature
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _generate(cfg, max_new: int, sample: bool, return_logits: bool,
              params, inputs, eos_id, pad_id, temperature, top_p, rng):
    logits0, state, kept = prefill(cfg, params, inputs, max_new)
    b, vocab = logits0.shape

    def choose(logits, t):
        if sample:
            return sample_token(logits, jax.random.fold_in(rng, t), temperature, top_p)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    tok = choose(logits0, 0)
    tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
    all_logits = (jnp.zeros((b, max_new, vocab), jnp.float32).at[:, 0].set(logits0)
                  if return_logits else None)
    carry = (jnp.int32(1), tok, tok == eos_id, tokens, jnp.ones((b,), jnp.int32), state, all_logits)

    def cond(c):
        t, _, done = c[:3]
        return (t < max_new) & ~jnp.all(done)

    def body(c):
        t, tok, done, tokens, lengths, state, all_logits = c
        logits, state = decode_step(cfg, params, state, tok)
        new = jnp.where(done, pad_id, choose(logits, t))
        tokens = lax.dynamic_update_slice_in_dim(tokens, new[:, None], t, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        if return_logits:
            all_logits = lax.dynamic_update_slice_in_dim(all_logits, logits[:, None], t, axis=1)
        return t + 1, new, done | (new == eos_id), tokens, lengths, state, all_logits

    _, _, _, tokens, lengths, _, all_logits = lax.while_loop(cond, body, carry)
    out = {"tokens": tokens, "lengths": lengths, "kept": kept}
    if return_logits:
        out["logits"] = all_logits
    return out


@functools.lru_cache(maxsize=16)
def compiled(cfg_json: str, max_new_tokens: int, sample: bool, return_logits: bool = False):
    """The jitted generation for a config (JSON), `max_new_tokens` and greedy/sampling:
    f(params, inputs, eos_id, pad_id, temperature, top_p, rng) -> dict."""
    import ml_collections
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    return jax.jit(functools.partial(_generate, cfg, max_new_tokens, sample, return_logits))


def check_inputs(cfg, inputs: Inputs, max_new_tokens: int) -> None:
    """Fails on what generation cannot serve, naming the sample and the limit."""
    m = cfg.model
    checks.check_inputs(m, inputs)
    n_vision = n_vision_tokens(m)
    valid = np.asarray(inputs.text_valid)
    pos = np.asarray(inputs.text_pos)
    has_image = np.asarray(inputs.has_image)
    slot = np.asarray(inputs.image_slot)
    if inputs.pixels is not None and inputs.text_rope is None:  # LLaVA's NHWC images
        want = (m.vision.image_size, m.vision.image_size, m.vision.num_channels)
        if tuple(inputs.pixels.shape[1:]) != want:
            raise ValueError(f"inputs.pixels has shape {tuple(inputs.pixels.shape)}; expected "
                             f"[B, {want[0]}, {want[1]}, {want[2]}] (use "
                             "hidrop_jax.data.image.preprocess, which resizes any image)")
    limit = m.text.max_position_embeddings
    for i in range(valid.shape[0]):
        if not valid[i].any():
            raise ValueError(f"sample {i} has an empty prompt (no valid text token)")
        last_text = pos[i][valid[i]].max()
        n = n_vision if inputs.vision_valid is None else int(np.asarray(inputs.vision_valid[i]).sum())
        if has_image[i] and slot[i] + n - 1 > last_text:
            raise ValueError(
                f"sample {i}: the prompt ends with the image; generation needs at least one text "
                "token after it (the first new token is predicted from the last prompt token)")
        p0 = max(int(last_text), int(slot[i]) + n - 1 if has_image[i] else -1) + 1
        if p0 + max_new_tokens > limit:
            raise ValueError(
                f"sample {i}: the prompt takes {p0} positions (image slots included) and "
                f"max_new_tokens={max_new_tokens} more would reach position "
                f"{p0 + max_new_tokens - 1}, beyond the limit "
                f"model.text.max_position_embeddings={limit} (positions 0..{limit - 1}); "
                "shorten the prompt or lower max_new_tokens")


def generate(cfg, params, inputs: Inputs, *, max_new_tokens: int, eos_id: Optional[int] = None,
             pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, rng=None,
             return_logits: bool = False) -> dict:
    """Generates up to `max_new_tokens` per sample under `cfg.hidrop`.

    inputs: the model's native batch (`Inputs`; right-padded text stream, any mix of samples
    with and without an image). Greedy for temperature 0, else temperature + top-p sampling with
    the explicit PRNG key `rng`. A sample stops after emitting `eos_id` (None: never) and emits
    `pad_id` from then on.

    -> {"tokens": [B, max_new] int32, "lengths": [B] tokens generated (EOS included),
        "kept": per cut the original vision indices kept [B, k]} (+ "logits" [B, max_new, V]:
        the distribution each token was chosen from, if `return_logits`).
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens!r}; allowed: an int ≥ 1")
    if not temperature >= 0:
        raise ValueError(f"temperature = {temperature!r}; allowed: ≥ 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p = {top_p!r}; allowed: a float in (0, 1]")
    sample = temperature > 0
    if sample and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: rng=jax.random.key(0)")
    check_inputs(cfg, inputs, int(max_new_tokens))
    f = compiled(cfg.to_json(), int(max_new_tokens), bool(sample), bool(return_logits))
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos = -1 if eos_id is None else int(eos_id)
    return f(params, inputs, jnp.int32(eos), jnp.int32(pad_id), jnp.float32(temperature or 1.0),
             jnp.float32(top_p), rng)


def generate_hf(cfg, params, input_ids, pixel_values=None, attention_mask=None, **kw) -> dict:
    """`generate` for HF-style inputs (image token expanded n_vision times, left or right
    padded; see the family's `hf_to_inputs`, which takes the processor outputs it names)."""
    f = family(cfg.model)
    proc = {k: kw.pop(k) for k in f.processor_outputs if k in kw}
    inputs, _, m = f.hf_to_inputs(cfg.model, input_ids, pixel_values, attention_mask, **proc)
    if m is not cfg.model:  # the batch's grid
        cfg = cfg.copy_and_resolve_references()
        cfg.model = m
    return generate(cfg, params, inputs, **kw)


# ----------------------------------------------------------------------------- CLI

def _load(args):
    """(cfg, params, tokenizer) for `--workdir`/`--hf` (any directory `checkpoint.open_run`
    reads; our exports bring back their schedule and chat template)."""
    path = args.hf or args.workdir
    run = open_run(path, step=args.step)
    cfg = run.cfg
    tok_dir = find_tokenizer(path, cfg, explicit=args.tokenizer)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer in {Path(path) / 'tokenizer'} or {path}; pass --tokenizer DIR")
    return cfg, run.params, _tokenizer(tok_dir)


def _tokenizer(path):
    from transformers import AutoProcessor, AutoTokenizer
    try:
        proc = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        tok = getattr(proc, "tokenizer", proc)
    except Exception:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def prompt_inputs(cfg, tokenizer, prompt: str, pixels=None, template: str = "v1") -> Inputs:
    """One prompt (and an optional preprocessed image [H, W, 3]) -> `Inputs` (batch of 1):
    <s> + text before the image + (image slots) + text after it, as the data pipeline lays it
    out, ending where the assistant's answer would start."""
    has_image = pixels is not None
    if template == "none":
        before, after = "", prompt
    else:
        r = templates.render(template, [prompt], [""], has_image)
        before, after = r.before, r.after[:r.spans[0][0]].rstrip(" ")
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    head, tail = bos + enc(before), enc(after)
    ids = head + tail
    n = n_vision_tokens(cfg.model) if has_image else 0
    pos = [i if i < len(head) else i + n for i in range(len(ids))]
    rope, rows = {}, family(cfg.model).rope_rows
    if rows is not None:  # e.g. M-RoPE rows, as the data pipeline numbers them
        rope = {k: jnp.asarray(x)[None] for k, x in rows(
            cfg.model, np.asarray(pos), np.ones(len(ids), bool), len(head), has_image,
            n_vision_tokens(cfg.model), pixels).items()}
    return Inputs(
        text_ids=jnp.asarray([ids], jnp.int32), text_pos=jnp.asarray([pos], jnp.int32),
        text_valid=jnp.ones((1, len(ids)), bool), image_slot=jnp.asarray([len(head)], jnp.int32),
        has_image=jnp.asarray([has_image]),
        pixels=None if pixels is None else jnp.asarray(pixels, jnp.float32)[None], **rope)


def describe_stages(cfg, kept) -> list[str]:
    """Human-readable vision tokens per stage and the kept indices of every cut (sample 0)."""
    s = schedule_of(cfg)
    lines = []
    for a, b, n in s.segments():
        what = "text only" if n == 0 else f"{n} vision tokens"
        lines.append(f"  layer{f' {a}' if b == a + 1 else f's {a}-{b - 1}'}: {what}")
    for i, (p, k) in enumerate(zip(s.prune_after, kept)):
        idx = np.asarray(k)[0].tolist()
        lines.append(f"  cut after layer {p}: kept {len(idx)} of "
                     f"{s.keep[i - 1] if i else s.n_vision}: {idx}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hidrop_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="an import-hf checkpoint or a training workdir")
    src.add_argument("--hf", help="a Hugging Face LLaVA directory")
    ap.add_argument("--image", help="an image file (any size: padded to a square and resized)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--schedule", help=f"a HiDrop preset {PRESETS} or a schedule JSON file (default: the "
                    "checkpoint's, or hidrop_schedule.json beside HF weights, else vanilla)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", choices=(*templates.TEMPLATES, "none"),
                    help="chat template (default: the run's data.template, else v1)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: beside the weights)")
    ap.add_argument("--step", type=int, help="a training workdir's step (default: its latest)")
    args = ap.parse_args(argv)
    # arguments first, weights after (loading a 7B model takes minutes)
    if args.image and not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image} does not exist")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be ≥ 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"--temperature {args.temperature} must be ≥ 0 and --top-p {args.top_p} in (0, 1]")
    if args.schedule and args.schedule not in PRESETS and not os.path.isfile(args.schedule):
        raise ValueError(f"--schedule {args.schedule!r} is neither a preset {PRESETS} nor a JSON file")
    if args.tokenizer:
        find_tokenizer(".", explicit=args.tokenizer)  # fails now if it holds no tokenizer
    cfg, params, tok = _load(args)
    if args.schedule:
        apply_schedule(cfg, args.schedule)
    pixels = None
    if args.image:
        try:
            raw = Path(args.image).read_bytes()
            pixels = family(cfg.model).preprocess(cfg.model, raw)  # the family's layout
        except (OSError, ValueError) as e:
            raise ValueError(f"--image {args.image} cannot be read as an image ({e})") from None
    template = args.template or ("data" in cfg and cfg.data.get("template")) or "v1"
    inputs = prompt_inputs(cfg, tok, args.prompt, pixels, template)
    params = jax.tree.map(jnp.asarray, params)
    out = generate(cfg, params, inputs, max_new_tokens=args.max_new_tokens,
                   eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                   temperature=args.temperature, top_p=args.top_p,
                   rng=jax.random.PRNGKey(args.seed))
    n = int(out["lengths"][0])
    ids = np.asarray(out["tokens"][0, :n]).tolist()
    print(tok.decode(ids, skip_special_tokens=True).strip())
    name = cfg.hidrop.name
    print(f"\n[{n} tokens generated: {ids}; schedule {name}: mean "
          f"{schedule_of(cfg).mean_tokens():.1f} vision tokens/layer]")
    if pixels is not None:
        print("\n".join(describe_stages(cfg, out["kept"])))


if __name__ == "__main__":
    cli.run(main)
