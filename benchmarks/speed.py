"""Speed and memory of HiDrop schedules side by side, and our vanilla forward vs PyTorch's.

    python benchmarks/speed.py [--schedules vanilla,pdrop,tok80,tok64,tok48] [--repeats 5]

One model with LLaVA-1.5's proportions where they matter for HiDrop (32 decoder layers, 576
vision tokens from a 336×336 image with 14-pixel patches, MLP = 2.6875 × width as Vicuna's,
a vision tower ~5% of the LLM) at a width this CPU can run. For each schedule, in one process:

* train step: forward + backward + AdamW (projector + LLM trainable, vision tower frozen as in
  LLaVA stage 2), batch B, median seconds over `--repeats` runs after a warm-up; and the
  forward + backward alone (the gradient, no optimizer: the part whose FLOPs the tokens set);
* prefill: forward of one prompt (batch 1), median seconds; also "serial": the same prefill as
  two programs, the vision branch (`encode_image`) first and then the LLM given its output,
  so nothing of the vision branch can overlap the text-only layers (parallel decoupling off);
  and the matmul FLOPs of the compiled prefill that depend on the text only / on the pixels
  only / on both (`hidrop_jax.xla_graph`);
* decode: greedy tokens per second after the prefill (one compiled while-loop, per-stage caches):
  (new_tokens − 1) / [t(generate new_tokens) − t(generate 1)];
* peak memory: XLA's `memory_analysis()` of the compiled train step (temporaries + arguments);
* predicted ratio: the paper's per-layer formula Σ_l F(n_l + T) plus the vision tower, relative
  to vanilla (what the FLOPs say the time ratio should be); for training, the decoder and the
  projector count 3× (forward + both backward products) and the frozen tower 1×.

`--family qwen2_5_vl`: the same measurements on a Qwen2.5-VL of the 7B's proportions (28
layers, GQA 7:1 where the width allows, M-RoPE, a 672×672 image = 2304 patches through a
4-block window-attention ViT with one full-attention block, 2×2 merger = 576 tokens); no
PyTorch comparison.

Then our vanilla prefill against PyTorch `LlavaForConditionalGeneration` on identical weights
(exported with `save_hf`), torch using the same number of CPU threads. The machine is shared and
noisy: read the ratios, which are measured side by side in one run; absolute CPU times only
describe this machine.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hidrop_jax.config import make_config, model_config, schedule_of  # noqa: E402
from hidrop_jax.families import family, family_name  # noqa: E402
from hidrop_jax.families import qwen2_5_vl as qwen  # noqa: E402
from hidrop_jax.metrics import token_nll  # noqa: E402
from hidrop_jax import xla_graph  # noqa: E402
from hidrop_jax.model import Inputs, encode_image, forward, init_params  # noqa: E402

SCHEDULES = ("vanilla", "pdrop", "tok80", "tok64", "tok48")


def _flops_module():
    spec = importlib.util.spec_from_file_location("bench_flops", os.path.join(ROOT, "benchmarks", "flops.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_config(width: int, schedule: str, family: str = "llava"):
    if family == "qwen2_5_vl":
        heads = max(1, width // 64)
        model = qwen.model_config(
            vision=dict(depth=4, hidden_size=96, intermediate_size=384, num_heads=4,
                        fullatt_block_indexes=(3,), image_size=(672, 672)),
            text=dict(vocab_size=2048, hidden_size=width, intermediate_size=int(width * 5.2857),
                      num_layers=28, num_heads=heads, num_kv_heads=max(1, heads // 7),
                      mrope_section=(8, 12, 12), max_position_embeddings=2048))
        cfg = make_config(model, f"schedule={schedule}")
        cfg.train.update(trainable="projector+llm", grad_accum=1, lr=1e-4, warmup_steps=1, steps=100)
        return cfg
    model = model_config(
        vision=dict(image_size=336, patch_size=14, hidden_size=96, intermediate_size=384,
                    num_layers=4, num_heads=4),
        text=dict(vocab_size=2048, hidden_size=width, intermediate_size=int(width * 2.6875),
                  num_layers=32, num_heads=max(1, width // 64), max_position_embeddings=2048),
        image_token_id=3)
    cfg = make_config(model, f"schedule={schedule}")
    cfg.train.update(trainable="projector+llm", grad_accum=1, lr=1e-4, warmup_steps=1, steps=100)
    return cfg


def make_inputs(cfg, batch: int, text_len: int, seed: int = 0) -> tuple[Inputs, object]:
    """A prompt of `text_len` text tokens with the image after 8 of them; answer rows labelled."""
    from hidrop_jax.batch import Targets
    rng = np.random.default_rng(seed)
    n = schedule_of(cfg).n_vision
    ids = rng.integers(5, cfg.model.text.vocab_size, (batch, text_len)).astype(np.int32)
    slot = 8
    pos = np.arange(text_len) + np.where(np.arange(text_len) >= slot, n, 0)
    rope, f = {}, family(cfg.model)
    px = rng.normal(size=(batch, *f.pixels_shape(cfg.model))).astype(np.float32)  # Qwen: patches
    if f.rope_rows is not None:  # M-RoPE rows
        rows = f.rope_rows(cfg.model, pos, np.ones(text_len, bool), slot, True, n)
        rope = {k: jnp.asarray(np.broadcast_to(x, (batch,) + x.shape)) for k, x in rows.items()}
    inputs = Inputs(jnp.asarray(ids), jnp.asarray(np.broadcast_to(pos, ids.shape).astype(np.int32)),
                    jnp.ones(ids.shape, bool), jnp.full((batch,), slot, jnp.int32), jnp.ones((batch,), bool),
                    jnp.asarray(px), jnp.full((batch, 1), text_len - 9, jnp.int32), jnp.ones((batch, 1), bool),
                    **rope)
    mask = np.zeros(ids.shape, bool)
    mask[:, text_len - 9:text_len - 1] = True
    labels = np.where(mask, np.roll(ids, -1, axis=1), -100).astype(np.int32)
    targets = Targets(jnp.asarray(labels), jnp.asarray(mask), jnp.zeros(ids.shape, jnp.int32),
                      jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch,), bool))
    return inputs, targets


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() after a warm-up. PyTorch CPU results pass through
    `block_until_ready` unchanged (they are ready when returned)."""
    jax.block_until_ready(fn())  # warm-up (and compile)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def decode_rate(t_one: float, t_n: float, n: int):
    """Greedy tokens/s from the times of generating 1 and n tokens (the prefill cancels), or None
    where t_n ≤ t_one: the decode is below the timer's noise at this size (raise --new-tokens)."""
    return (n - 1) / (t_n - t_one) if t_n > t_one else None


def rate(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def measure_schedule(name: str, params, a) -> dict:
    from hidrop_jax import generate as gen
    from hidrop_jax import train as train_lib
    cfg = bench_config(a.width, name, a.family)
    s = schedule_of(cfg)
    tx, _ = train_lib.make_optimizer(cfg.train, params)
    state = dict(params=params, opt_state=jax.jit(tx.init)(params), step=jnp.zeros((), jnp.int32),
                 rng=jax.random.PRNGKey(0))
    inputs, targets = make_inputs(cfg, a.batch, a.text_len)
    step = jax.jit(train_lib.make_train_step(cfg, tx))
    compiled = step.lower(state, inputs, targets).compile()
    ma = compiled.memory_analysis()
    train_s = timed(lambda: compiled(state, inputs, targets)[1]["loss"], a.repeats)
    frozen = {"vision": params["vision"]}
    trainable = {k: v for k, v in params.items() if k != "vision"}
    grad = jax.jit(jax.grad(lambda p: token_nll(forward(cfg, frozen | p, inputs), targets)[0]))
    grad_s = timed(lambda: grad(trainable), a.repeats)
    one, _ = make_inputs(cfg, 1, a.text_len, seed=1)
    one = one._replace(query_idx=None, query_valid=None)
    fwd = jax.jit(lambda p, x: forward(cfg, p, x), keep_unused=True)
    prefill_s = timed(lambda: fwd(params, one), a.repeats)
    branch = xla_graph.branches(fwd.lower(params, one).compile().as_text(),
                                {"text": ("x.text",), "image": ("x.pixels",)})
    vis = jax.jit(lambda p, px: encode_image(cfg.model, p, px))
    llm = jax.jit(lambda p, x, v: forward(cfg, p, x._replace(pixels=None), vision=v))
    serial_s = timed(lambda: llm(params, one, jax.block_until_ready(vis(params, one.pixels))), a.repeats)
    gen_s = {n: timed(lambda: gen.generate(cfg, params, one, max_new_tokens=n)["tokens"],
                      max(1, a.repeats // 2)) for n in (1, a.new_tokens)}
    return dict(
        schedule=name, mean_vision_tokens=s.mean_tokens(), train_step_s=train_s, grad_s=grad_s,
        prefill_s=prefill_s, prefill_serial_s=serial_s,
        prefill_gflops={k or "params": v / 1e9 for k, v in branch.items()},
        decode_tokens_per_s=decode_rate(gen_s[1], gen_s[a.new_tokens], a.new_tokens),
        peak_memory_mib=None if ma is None else (ma.temp_size_in_bytes + ma.argument_size_in_bytes) / 2**20,
        temp_memory_mib=None if ma is None else ma.temp_size_in_bytes / 2**20,
        predicted_macs=_predicted_macs(cfg, s, a.text_len),
        predicted_train_macs=_predicted_macs(cfg, s, a.text_len, train=True))


def _predicted_macs(cfg, s, text_len: int, train: bool = False) -> float:
    """Prefill: decoder + tower + projector. Train (vision tower frozen): decoder and projector
    3× (forward, gradient w.r.t. inputs and w.r.t. weights), the tower's forward once."""
    fl = _flops_module()
    t, v = cfg.model.text, cfg.model.vision
    decoder = sum(fl.paper_layer_macs(n + text_len, t.hidden_size, t.intermediate_size)
                  for n in s.tokens_per_layer())
    tower_and_projector = fl.tower_formula_macs(cfg)
    if not train:
        return decoder + tower_and_projector
    if family_name(cfg.model) == "llava":
        projector = s.n_vision * (v.hidden_size * t.hidden_size + t.hidden_size ** 2)
    else:  # the merger: 4D -> 4D -> d on the merged tokens
        u = v.spatial_merge_size ** 2 * v.hidden_size
        projector = s.n_vision * (u * u + u * t.hidden_size)
    tower = tower_and_projector - projector
    return 3 * (decoder + projector) + tower


def torch_vs_ours(params, a) -> dict:
    """Our vanilla prefill vs PyTorch's on identical weights, same CPU thread count."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from hidrop_jax.hf.inputs import expand_image_tokens
    from hidrop_jax.hf.save import save_hf
    cfg = bench_config(a.width, "vanilla")
    one, _ = make_inputs(cfg, 1, a.text_len, seed=1)
    one = one._replace(query_idx=None, query_valid=None)
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        save_hf(cfg, jax.device_get(params), os.path.join(d, "hf"))
        hf = LlavaForConditionalGeneration.from_pretrained(os.path.join(d, "hf")).eval()
    batch = {k: np.asarray(v) for k, v in one._asdict().items() if v is not None}
    ids, mask, cols = expand_image_tokens(batch, cfg.model.image_token_id, 576)
    px = torch.tensor(np.asarray(one.pixels).transpose(0, 3, 1, 2))
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

    def torch_fwd():
        with torch.no_grad():
            return hf(input_ids=ids_t, attention_mask=mask_t, pixel_values=px).logits

    torch_s = timed(torch_fwd, a.repeats)
    fwd = jax.jit(lambda p, x: forward(cfg, p, x))
    ours_s = timed(lambda: fwd(params, one), a.repeats)
    ours = np.asarray(fwd(params, one))
    diff = float(np.abs(ours[0] - torch_fwd().numpy()[0][cols[0]]).max())
    return dict(torch_prefill_s=torch_s, ours_prefill_s=ours_s, torch_threads=threads,
                ours_over_torch=ours_s / torch_s, max_abs_logit_diff=diff,
                kernels=kernels_vs_torch(cfg, a))


def kernels_vs_torch(cfg, a) -> dict:
    """The two kernels the prefill is made of, alone, at its shapes: an MLP matmul and causal
    attention of the whole sequence, XLA:CPU vs PyTorch (seconds, medians)."""
    import torch
    t = cfg.model.text
    n = 576 + a.text_len
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, t.hidden_size)).astype(np.float32)
    w = rng.normal(size=(t.hidden_size, t.intermediate_size)).astype(np.float32)
    q = rng.normal(size=(1, n, t.num_heads, t.head_dim)).astype(np.float32)
    mm = jax.jit(jnp.matmul)
    att = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True))
    xt, wt, qt = torch.tensor(x), torch.tensor(w), torch.tensor(q).transpose(1, 2)
    x, w, q = jnp.asarray(x), jnp.asarray(w), jnp.asarray(q)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_timed(fn):
        with torch.no_grad():
            return timed(fn, 20)

    return dict(
        shape=f"matmul [{n},{t.hidden_size}]x[{t.hidden_size},{t.intermediate_size}]; "
              f"attention {n} tokens x {t.num_heads} heads x {t.head_dim}",
        matmul_xla_s=timed(lambda: mm(x, w), 20), matmul_torch_s=torch_timed(lambda: xt @ wt),
        attention_xla_s=timed(lambda: att(q), 20),
        attention_torch_s=torch_timed(lambda: sdpa(qt, qt, qt, is_causal=True)))


def table(res: dict) -> str:
    rows = res["schedules"]
    v = rows[0]
    ratio = lambda key, r: v[key] / r[key]  # noqa: E731 (vanilla / schedule)
    lines = [f"{res.get('family', 'llava')}, width {res['width']}, {res.get('layers', 32)} layers, 576 vision tokens, T={res['text_len']} text tokens, "
             f"train batch {res['batch']}; medians of {res['repeats']} runs; ratios = vanilla / schedule",
             "",
             "Training (projector + LLM trainable, AdamW):",
             "",
             "| schedule | mean vis. tok. | train step (s) | speedup | fwd+bwd (s) | speedup "
             "| predicted (FLOPs) | fwd+bwd / predicted | step predicted (FLOPs + AdamW) "
             "| step / predicted | peak mem (MiB) | mem vs vanilla |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    adamw = v["train_step_s"] - v["grad_s"]  # the update: per parameter, the same for every schedule
    for r in rows:
        pred = ratio("predicted_train_macs", r)
        step_pred = v["train_step_s"] / (v["grad_s"] / pred + adamw)
        lines.append(
            f"| {r['schedule']} | {r['mean_vision_tokens']:.0f} | {r['train_step_s']:.3f} "
            f"| {ratio('train_step_s', r):.2f}× | {r['grad_s']:.3f} | {ratio('grad_s', r):.2f}× "
            f"| {pred:.2f}× | {ratio('grad_s', r) / pred:.2f} | {step_pred:.2f}× "
            f"| {ratio('train_step_s', r) / step_pred:.2f} "
            f"| {r['peak_memory_mib']:.0f} | {r['peak_memory_mib'] / v['peak_memory_mib']:.2f} |")
    lines += ["", "Inference (batch 1):", "",
              "| schedule | prefill (s) | speedup | predicted (FLOPs) | prefill / predicted "
              "| serial vision branch (s) | serial / decoupled | GFLOP text-only | GFLOP image-only "
              "| GFLOP both | decode (tok/s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred = ratio("predicted_macs", r)
        g = r["prefill_gflops"]
        lines.append(
            f"| {r['schedule']} | {r['prefill_s']:.4f} | {ratio('prefill_s', r):.2f}× | {pred:.2f}× "
            f"| {ratio('prefill_s', r) / pred:.2f} | {r['prefill_serial_s']:.4f} "
            f"| {r['prefill_serial_s'] / r['prefill_s']:.2f} | {g.get('text', 0):.2f} "
            f"| {g.get('image', 0):.2f} | {g.get('image+text', 0):.2f} | {rate(r['decode_tokens_per_s'])} |")
    t = res.get("torch")
    if t:
        lines += ["", f"vanilla prefill, ours {t['ours_prefill_s']:.4f} s vs PyTorch {t['torch_prefill_s']:.4f} s "
                      f"({t['torch_threads']} threads): ours / torch = {t['ours_over_torch']:.2f}; "
                      f"max |Δlogit| {t['max_abs_logit_diff']:.1e}"]
        k = t["kernels"]
        lines += [f"kernels alone ({k['shape']}): matmul XLA {k['matmul_xla_s'] * 1e3:.2f} ms vs "
                  f"torch {k['matmul_torch_s'] * 1e3:.2f} ms ({k['matmul_xla_s'] / k['matmul_torch_s']:.2f}×); "
                  f"attention XLA {k['attention_xla_s'] * 1e3:.2f} ms vs torch "
                  f"{k['attention_torch_s'] * 1e3:.2f} ms ({k['attention_xla_s'] / k['attention_torch_s']:.2f}×)"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--family", default="llava", choices=("llava", "qwen2_5_vl"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "speed.json"))
    a = ap.parse_args(argv)
    t0 = time.time()
    base = bench_config(a.width, "vanilla", a.family)
    params = init_params(base, jax.random.PRNGKey(0))
    rows = []
    for name in a.schedules.split(","):
        rows.append(measure_schedule(name, params, a))
        print(f"  {name}: train {rows[-1]['train_step_s']:.3f} s, prefill {rows[-1]['prefill_s']:.4f} s",
              flush=True)
    res = dict(width=a.width, text_len=a.text_len, batch=a.batch, repeats=a.repeats, schedules=rows,
               device=str(jax.devices()[0]), cpu_count=os.cpu_count(), family=a.family,
               layers=base.model.text.num_layers)
    if not a.no_torch and a.family == "llava":
        res["torch"] = torch_vs_ours(params, a)
    res["seconds"] = time.time() - t0
    print(table(res))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"\n{res['seconds']:.0f} s; written to {a.out}")
    return res


if __name__ == "__main__":
    main()
