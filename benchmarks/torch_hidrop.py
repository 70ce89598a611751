"""The saving in PyTorch: an export's HiDrop modeling code (trust_remote_code) vs vanilla.

    python benchmarks/torch_hidrop.py [--schedules vanilla,pdrop,tok80,tok64,tok48] [--repeats 5]

The model of `benchmarks/speed.py` (LLaVA-1.5 proportions where they matter: 32 decoder layers,
576 vision tokens from 336×336 / patch 14, MLP 2.6875 × width; random weights) is exported once
with `save_hf` under Tok64 and loaded with `AutoModelForImageTextToText(...,
trust_remote_code=True)`; each schedule is then set on that one model
(`set_hidrop_schedule`; vanilla is transformers' own LLaVA forward), so every row runs the same
weights, in one process, on the same threads, round-robin (each call of each schedule in turn):

* prefill: one prompt (batch 1, T text tokens, the image after 8 of them), a forward that fills
  HF's cache as `generate` does (logits of the last token only), median of `--repeats`;
* decode: greedy tokens per second after the prefill: 1 / the median time of one new token's
  forward against that cache (`--new-tokens` steps; `generate`'s own per-step Python bookkeeping
  excluded, the same for every schedule);
* KV cache: keys held over all layers after the prefill (what each decoded token attends to).

The machine is shared: read the ratios, measured side by side; absolute times describe this CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hidrop_jax.config import schedule_of  # noqa: E402
from hidrop_jax.hidrop.schedule import preset  # noqa: E402

SCHEDULES = ("vanilla", "pdrop", "tok80", "tok64", "tok48")


def _speed_module():
    spec = importlib.util.spec_from_file_location("bench_speed", os.path.join(ROOT, "benchmarks", "speed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prompt(cfg, text_len: int, seed: int = 0):
    """HF-style batch of 1: 8 text tokens, the 576 image tokens, the rest of the text."""
    import torch
    rng = np.random.default_rng(seed)
    n = schedule_of(cfg).n_vision
    text = rng.integers(5, cfg.model.text.vocab_size, text_len)
    ids = np.concatenate([text[:8], np.full(n, cfg.model.image_token_id), text[8:]])[None]
    px = rng.normal(size=(1, 3, 336, 336)).astype(np.float32)
    return torch.tensor(ids), torch.ones(ids.shape, dtype=torch.long), torch.tensor(px)


def set_schedule(model, name: str, num_layers: int):
    s = preset(name, num_layers, 576)
    model.set_hidrop_schedule(None if name == "vanilla" else dict(
        inject_layer=s.inject_layer, prune_after=list(s.prune_after), keep=list(s.keep),
        exit_layer=s.exit_layer))
    assert model.vision_tokens_per_layer() == s.tokens_per_layer()
    return s


def measure(model, names, cfg, ids, mask, px, a) -> list:
    """Round-robin over the schedules (one model, its schedule switched before every call), so
    each sees the same share of the shared machine's load."""
    import torch
    L = cfg.model.text.num_layers

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True,
                         logits_to_keep=1)

    def step(state):
        cache, tok, m = state
        m = torch.cat([m, torch.ones_like(tok)], 1)
        with torch.no_grad():
            out = model(input_ids=tok, attention_mask=m, position_ids=m.sum(1, keepdim=True) - 1,
                        cache=cache, use_cache=True)
        return out.cache, out.logits[:, -1].argmax(-1, keepdim=True), m

    rows = {n: dict(schedule=n, mean_vision_tokens=set_schedule(model, n, L).mean_tokens(),
                    prefill=[], decode=[]) for n in names}
    states = {}
    for r in range(a.repeats + 1):  # round 0: warm-up
        for n in names:
            set_schedule(model, n, L)
            t0 = time.perf_counter()
            out = prefill()
            if r:
                rows[n]["prefill"].append(time.perf_counter() - t0)
            else:
                rows[n]["cache_keys"] = sum(layer.keys.shape[2] for layer in out.cache.layers)
                states[n] = (out.cache, out.logits[:, -1].argmax(-1, keepdim=True), mask)
    for i in range(a.new_tokens):
        for n in names:
            set_schedule(model, n, L)
            t0 = time.perf_counter()
            states[n] = step(states[n])
            if i:
                rows[n]["decode"].append(time.perf_counter() - t0)
    out = []
    for n in names:
        r = rows[n]
        out.append(dict(schedule=n, mean_vision_tokens=r["mean_vision_tokens"],
                        prefill_s=statistics.median(r["prefill"]),
                        decode_step_s=statistics.median(r["decode"]),
                        decode_tokens_per_s=1.0 / statistics.median(r["decode"]),
                        cache_keys=r["cache_keys"]))
    return out


def table(res) -> str:
    rows = res["schedules"]
    base = next(r for r in rows if r["schedule"] == "vanilla")
    lines = [f"PyTorch {res['torch_version']} / transformers {res['transformers_version']}, "
             f"{res['threads']} threads; width {res['width']}, 32 layers, 576 vision tokens, "
             f"T={res['text_len']} text tokens, batch 1; medians of {res['repeats']} runs; "
             "speedup = vanilla / schedule", "",
             "| schedule | mean vis. tok. | prefill (s) | speedup | decode (tok/s) | speedup | KV keys (all layers) | vs vanilla |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['mean_vision_tokens']:.0f} | {r['prefill_s']:.4f} | "
            f"{base['prefill_s'] / r['prefill_s']:.2f}× | {r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× | {r['cache_keys']} | "
            f"{r['cache_keys'] / base['cache_keys']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared, "
                    "oversubscribed CPU two threads ran a matmul 4x slower than one)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "torch_hidrop.json"))
    a = ap.parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText
    from hidrop_jax.hf.save import save_hf
    from hidrop_jax.model import init_params
    torch.set_num_threads(a.threads)
    t0 = time.time()
    speed = _speed_module()
    cfg = speed.bench_config(a.width, "tok64")
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    with tempfile.TemporaryDirectory() as tmp:
        out = save_hf(cfg, params, os.path.join(tmp, "hf"))
        model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    ids, mask, px = prompt(cfg, a.text_len)
    rows = measure(model, a.schedules.split(","), cfg, ids, mask, px, a)
    res = dict(width=a.width, text_len=a.text_len, repeats=a.repeats, new_tokens=a.new_tokens,
               threads=torch.get_num_threads(), torch_version=torch.__version__,
               transformers_version=transformers.__version__, cpu_count=os.cpu_count(),
               schedules=rows, seconds=time.time() - t0)
    print(table(res))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"\n{res['seconds']:.0f} s; written to {a.out}")
    return res


if __name__ == "__main__":
    main()
