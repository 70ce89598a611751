"""Vicuna (LLaMA) + CLIP vision tower -> a Hugging Face LLaVA directory to start stage 1 from.

    python launch/assemble_llava.py --llm VICUNA_DIR --vision CLIP_DIR --out HF_LLAVA_DIR
    python -m hidrop_jax.convert import-hf HF_LLAVA_DIR CKPT_DIR

`import-hf` reads LLaVA directories only (vision tower + projector + LLM). Training LLaVA-1.5 from
scratch starts from a pretrained Vicuna and CLIP ViT-L/14-336 with a new projector; this script
puts them together, offline (local directories only, nothing is downloaded):

- the tokenizer (`--tokenizer`, default the LLM's) gets an `<image>` token if it has none
  (id = the old vocabulary size, 32000 for Vicuna: what `configs/llava15_7b.py` expects), and is
  saved into the output directory (use it as `--config.data.tokenizer`);
- the embedding and LM-head rows grow to a multiple of `--pad-to` (64: 32000 -> 32064 as in the
  llava-hf checkpoints); new rows are the mean of the old ones;
- the projector (mlp2x_gelu) is drawn like `torch.nn.Linear`'s default initialisation;
- weights are written in the legacy hub layout our importer and transformers 4.57/5.x read,
  in the source dtypes (the importer widens to float32), sharded above `--max-shard-gb`.

Needs torch + transformers (both pinned in requirements.txt); a Vicuna directory without a
`tokenizer.json` also needs the `sentencepiece` package for the fast-tokenizer conversion.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _tokenizer_with_image(path: str, flag: str):
    from transformers import AutoTokenizer
    if not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{flag} {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); pass "
            "--tokenizer DIR with a fast tokenizer (tokenizer.json), e.g. a llava-hf LLaVA-1.5 one")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast tokenizer is needed (tokenizer.json, or install "
                         "sentencepiece so that transformers can convert tokenizer.model)")
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    return tok, tok.convert_tokens_to_ids("<image>")


def _grow_rows(t, rows: int):
    """[V, D] -> [rows, D]; the new rows are the mean of the old ones."""
    import torch
    if t.shape[0] >= rows:
        return t
    extra = t.float().mean(0, keepdim=True).expand(rows - t.shape[0], -1).to(t.dtype)
    return torch.cat([t, extra], 0)


def _linear_init(gen, out_f: int, in_f: int):
    """torch.nn.Linear's default: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in))."""
    import torch
    bound = 1.0 / math.sqrt(in_f)
    w = (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound
    b = (torch.rand(out_f, generator=gen) * 2 - 1) * bound
    return w, b


def assemble(llm_dir: str, vision_dir: str, out_dir: str, *, tokenizer_dir: str | None = None,
             pad_to: int = 64, max_shard_bytes: int = 5 * 1024**3, seed: int = 0) -> dict:
    """Writes OUT_DIR (config.json, safetensors, tokenizer); returns the HF config dict."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaConfig

    from hidrop_jax.config import n_vision_tokens
    from hidrop_jax.hf.mapping import canonical_name, config_from_hf, config_to_hf, expected_tensors

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tok, image_id = _tokenizer_with_image(tokenizer_dir or llm_dir,
                                          "--tokenizer" if tokenizer_dir else "--llm")

    llm = LlamaForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype="auto")
    tconf = llm.config
    if tconf.tie_word_embeddings:
        raise ValueError(f"{llm_dir}: tied input/output embeddings are not LLaVA-1.5's layout")
    vocab = max(tconf.vocab_size, math.ceil(len(tok) / pad_to) * pad_to)
    tensors = {}
    for k, v in llm.state_dict().items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = _grow_rows(v, vocab)
        tensors[canonical_name("language_model." + k)] = v
    text_cfg = tconf.to_dict()
    text_cfg["vocab_size"] = vocab
    del llm

    clip = CLIPVisionModel.from_pretrained(vision_dir, local_files_only=True, dtype="auto")
    vconf = clip.config
    for k, v in clip.state_dict().items():
        if not k.endswith("position_ids"):
            tensors[canonical_name("vision_tower." + k)] = v  # with or without vision_model.
    del clip

    gen = torch.Generator().manual_seed(seed)
    h_v, h_t = vconf.hidden_size, tconf.hidden_size
    for name, (o, i) in (("linear_1", (h_t, h_v)), ("linear_2", (h_t, h_t))):
        w, b = _linear_init(gen, o, i)
        tensors[f"multi_modal_projector.{name}.weight"] = w
        tensors[f"multi_modal_projector.{name}.bias"] = b

    hf = LlavaConfig(vision_config=vconf.to_dict(), text_config=text_cfg, image_token_index=image_id,
                     projector_hidden_act="gelu", vision_feature_layer=-2,
                     vision_feature_select_strategy="default", tie_word_embeddings=False,
                     image_seq_length=(vconf.image_size // vconf.patch_size) ** 2).to_dict()
    cfg = config_from_hf(hf)  # fails here on anything our model does not support
    hf = config_to_hf(cfg)    # the form export-hf writes (loads in transformers 4.57 and 5.x)
    hf["image_seq_length"] = n_vision_tokens(cfg.model)

    want = set(expected_tensors(cfg))
    have = set(tensors)
    if want != have:
        raise ValueError(f"assembled tensors do not match the LLaVA layout: missing "
                         f"{sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}")

    out.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k].contiguous()
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    tok.save_pretrained(str(out))
    return hf


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python launch/assemble_llava.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", required=True, help="local LLaMA/Vicuna HF directory (e.g. vicuna-7b-v1.5)")
    ap.add_argument("--vision", required=True,
                    help="local CLIP HF directory (e.g. clip-vit-large-patch14-336; full CLIP or vision only)")
    ap.add_argument("--out", required=True, help="new HF LLaVA directory")
    ap.add_argument("--tokenizer", help="take the tokenizer from here instead of --llm")
    ap.add_argument("--pad-to", type=int, default=64, help="vocabulary rows rounded up to this (default 64)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = assemble(a.llm, a.vision, a.out, tokenizer_dir=a.tokenizer, pad_to=a.pad_to,
                  max_shard_bytes=int(a.max_shard_gb * 1024**3), seed=a.seed)
    t = hf["text_config"]
    print(f"wrote {a.out}: {t['num_hidden_layers']}-layer LLM, vocab {t['vocab_size']}, "
          f"<image> = {hf['image_token_index']}, {hf['image_seq_length']} vision tokens.\n"
          f"next: python -m hidrop_jax.convert import-hf {a.out} CKPT_DIR")


if __name__ == "__main__":
    main()
