"""One run on a lent GPU or TPU (at most ~8 minutes): parity with the CPU, the fused attention,
absolute times of every schedule, and PyTorch on the same device.

    python benchmarks/accelerator.py                      # the device's mid-size model
    python benchmarks/accelerator.py --small              # CPU smoke (the default on a CPU)
    [--layers 12 --width 2048 --vision-layers 24 --vision-width 1024 --text-len 128 --batch 8
     --schedules vanilla,pdrop,tok80,tok64,tok48 --budget-s 420 --out FILE]

A random LLaVA of `--layers` decoder layers of width `--width` (MLP 2.6875×, heads of 128,
vocab 32,064) behind a CLIP tower of `--vision-layers` × `--vision-width` on 336×336 images
(576 vision tokens), as LLaVA-1.5 is; weights seeded, initialised once, put on each device.
On whatever `jax.devices()[0]` is, in this order, skipping with a printed reason what the
platform lacks:

1. parity: prefill logits (batch 1, `--parity-layers` layers of the same widths) on the device
   against the CPU backend of this same process, same weights and inputs, in float32 and in
   bfloat16 (the device's bf16 also against the CPU's float32): max |Δ| relative to the
   largest |logit|, and argmax agreement over the text rows;
2. fused attention: `model.attention_impl` = cudnn (GPU, bf16) or pallas (TPU) against xla:
   prefill logits and time. On a CPU the Pallas kernel runs in interpret mode for parity only;
3. per schedule, in `--dtype` (bf16 on a device), with the platform's default attention
   (`attention_impl` None: the Pallas kernel on a TPU, XLA on a GPU): a train step (forward +
   backward + AdamW, projector + LLM trainable), its
   model TFLOP/s and MFU (`hidrop_jax.perf`), a prefill and greedy decode tokens/s
   (benchmarks/speed.py's inputs and timing, medians of `--repeats`);
4. PyTorch `LlavaForConditionalGeneration` (sdpa) on the same device and weights: vanilla
   prefill and decode, and its prefill logits against ours. On a GPU it needs torch with CUDA;
   on a TPU it is skipped.

Vanilla runs before PyTorch and the other schedules after it; `--budget-s` stops starting
schedules whose measurement (estimated as the last one's) would end past the budget. Writes a
table and benchmarks/results/accelerator-<platform>.json.
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
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hidrop_jax import generate as gen_lib  # noqa: E402
from hidrop_jax import perf  # noqa: E402
from hidrop_jax import train as train_lib  # noqa: E402
from hidrop_jax.config import make_config, model_config, schedule_of  # noqa: E402
from hidrop_jax.hidrop.schedule import PRESETS  # noqa: E402
from hidrop_jax.model import forward, init_params  # noqa: E402

SCHEDULES = ("vanilla", "pdrop", "tok80", "tok64", "tok48")
DEVICE_SIZES = dict(layers=12, width=2048, vision_layers=24, vision_width=1024, vocab=32064, parity_layers=4,
                    text_len=128, batch=8, new_tokens=32, repeats=5)
SMALL_SIZES = dict(layers=4, width=256, vision_layers=2, vision_width=64, vocab=2048, parity_layers=2,
                   text_len=32, batch=2, new_tokens=16, repeats=3)
FUSED = {"gpu": "cudnn", "tpu": "pallas"}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


speed = _load("speed")  # make_inputs (prompt with the image after 8 text tokens), timed


def bench_config(a, schedule: str = "vanilla", *, layers=None, dtype="float32", impl=None):
    width, vw = a.width, a.vision_width
    model = model_config(
        vision=dict(image_size=336, patch_size=14, hidden_size=vw, intermediate_size=4 * vw,
                    num_layers=a.vision_layers, num_heads=max(1, vw // 64)),
        text=dict(vocab_size=a.vocab, hidden_size=width, intermediate_size=int(width * 2.6875) // 64 * 64,
                  num_layers=layers or a.layers, num_heads=max(1, width // 128), max_position_embeddings=4096),
        image_token_id=3, dtype=dtype, attention_impl=impl)
    cfg = make_config(model, f"schedule={schedule}")
    cfg.train.update(trainable="projector+llm", lr=1e-4, warmup_steps=1, steps=100, batch_size=a.batch)
    cfg.data.max_len = a.text_len
    return cfg


def prompt(cfg, a, batch=1, seed=1):
    inputs, targets = speed.make_inputs(cfg, batch, a.text_len, seed=seed)
    return inputs._replace(query_idx=None, query_valid=None) if batch == 1 else inputs, targets


def put(tree, device):
    return jax.tree.map(lambda x: jax.device_put(x, device), tree)


def logits_on(cfg, params, inputs, device):
    fn = jax.jit(lambda p, x: forward(cfg, p, x))
    return np.asarray(fn(put(params, device), put(inputs, device)), np.float32)


def compare(got, want) -> dict:
    """max |Δ| / max |want| and argmax agreement over the text rows of batch row 0."""
    g, w = got[0], want[0]
    return dict(max_abs_diff=float(np.abs(g - w).max()), rel_to_max=float(np.abs(g - w).max() / np.abs(w).max()),
                argmax_agree=float((g.argmax(-1) == w.argmax(-1)).mean()))


def skipped(reason: str) -> dict:
    print(f"  skipped: {reason}", flush=True)
    return dict(skipped=reason)


def _error(e: Exception) -> dict:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    print(f"  failed: {line}", flush=True)
    return dict(error=line, traceback=traceback.format_exc()[-2000:])


# ----------------------------------------------------------------------------- 1. parity

def parity(a, host, dev, platform) -> dict:
    if platform == "cpu":
        return skipped("the device is the CPU: nothing to compare against")
    out = {}
    base = bench_config(a, layers=a.parity_layers)
    params = jax.device_get(init_params(base, jax.random.PRNGKey(0)))
    inputs, _ = prompt(base, a)
    cpu32 = logits_on(base, params, inputs, host)
    for dtype in ("float32", "bfloat16"):
        cfg = bench_config(a, layers=a.parity_layers, dtype=dtype)
        got = logits_on(cfg, params, inputs, dev)
        ref = cpu32 if dtype == "float32" else logits_on(cfg, params, inputs, host)
        out[dtype] = dict(vs_cpu_same_dtype=compare(got, ref))
        if dtype == "bfloat16":
            out[dtype]["vs_cpu_float32"] = compare(got, cpu32)
        print(f"  {dtype}: {out[dtype]}", flush=True)
    return out


# ----------------------------------------------------------------------------- 2. fused attention

def fused_attention(a, params, dev, platform) -> dict:
    impl = FUSED.get(platform)
    if impl is None:
        return _pallas_interpret(a) if a.small else skipped(
            f"no fused attention kernel on {platform}; the Pallas TPU kernel's parity in interpret "
            "mode is tests/test_fused_attention.py")
    dtype = "bfloat16"  # cuDNN's fused attention takes fp16/bf16 only
    inputs, _ = prompt(bench_config(a), a)
    inputs, p = put(inputs, dev), put(params, dev)
    out = dict(impl=impl, dtype=dtype)
    for name in ("xla", impl):
        cfg = bench_config(a, dtype=dtype, impl=name)
        try:
            fn = jax.jit(lambda p, x, cfg=cfg: forward(cfg, p, x))
            out[name] = dict(prefill_s=speed.timed(lambda: fn(p, inputs), a.repeats),
                             logits=np.asarray(fn(p, inputs), np.float32))
        except Exception as e:  # noqa: BLE001 (a kernel the device refuses is a result)
            out[name] = _error(e)
    if "logits" in out.get(impl, {}) and "logits" in out["xla"]:
        out["vs_xla"] = compare(out[impl]["logits"], out["xla"]["logits"])
        out["speedup"] = out["xla"]["prefill_s"] / out[impl]["prefill_s"]
    for name in ("xla", impl):
        out[name].pop("logits", None)
    print(f"  {out}", flush=True)
    return out


def _pallas_interpret(a) -> dict:
    """CPU: the TPU kernel in Pallas' interpret mode against the XLA path (parity only)."""
    from jax.experimental.pallas import tpu as pltpu
    base = bench_config(a, layers=a.parity_layers)
    params = init_params(base, jax.random.PRNGKey(0))
    inputs, _ = prompt(base, a)
    want = np.asarray(jax.jit(lambda p, x: forward(base, p, x))(params, inputs))
    cfg = bench_config(a, layers=a.parity_layers, impl="pallas")
    with pltpu.force_tpu_interpret_mode():
        got = np.asarray(jax.jit(lambda p, x: forward(cfg, p, x))(params, inputs))
    out = dict(impl="pallas (interpret mode, parity only; times mean nothing)", vs_xla=compare(got, want))
    print(f"  {out}", flush=True)
    return out


# ----------------------------------------------------------------------------- 3. schedules

def measure_schedule(name, a, params, dev, peak) -> dict:
    cfg = bench_config(a, name, dtype=a.dtype)
    s = schedule_of(cfg)
    tx, _ = train_lib.make_optimizer(cfg.train, params)
    p = put(params, dev)
    state = dict(params=p, opt_state=jax.jit(tx.init)(p), step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
    inputs, targets = put(speed.make_inputs(cfg, a.batch, a.text_len), dev)
    step = jax.jit(train_lib.make_train_step(cfg, tx))
    train_s = speed.timed(lambda: step(state, inputs, targets)[1]["loss"], a.repeats)
    one, _ = prompt(cfg, a)
    one = put(one, dev)
    fwd = jax.jit(lambda p, x: forward(cfg, p, x))
    prefill_s = speed.timed(lambda: fwd(p, one), a.repeats)
    gen = {n: speed.timed(lambda n=n: gen_lib.generate(cfg, p, one, max_new_tokens=n)["tokens"],
                          max(3, a.repeats)) for n in (1, a.new_tokens)}
    fig = perf.step_figures(cfg, 1, train_s, peak)
    return dict(schedule=name, mean_vision_tokens=s.mean_tokens(), train_step_s=train_s,
                train_tokens_per_s=fig["tokens_per_s_per_device"],
                train_model_tflops_per_s=fig["model_tflops_per_s_per_device"], train_mfu=fig.get("mfu"),
                prefill_s=prefill_s, decode_tokens_per_s=speed.decode_rate(gen[1], gen[a.new_tokens], a.new_tokens))


# ----------------------------------------------------------------------------- 4. PyTorch

def torch_same_device(a, params, platform) -> dict:
    try:
        import torch
    except ImportError:
        return skipped("torch is not installed (the `torch` extra)")
    if platform == "tpu":
        return skipped("PyTorch on TPU needs torch_xla, which this project does not use")
    if platform == "gpu" and not torch.cuda.is_available():
        return skipped(f"torch {torch.__version__} sees no CUDA device (a CPU-only wheel?)")
    from transformers import LlavaForConditionalGeneration
    from hidrop_jax.hf.inputs import expand_image_tokens
    from hidrop_jax.hf.save import save_hf
    device = "cuda" if platform == "gpu" else "cpu"
    if device == "cpu":  # beside JAX's idle threads two torch threads ran 25× slower here
        torch.set_num_threads(a.torch_threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = bench_config(a, dtype=a.dtype)
    tdtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as d:
        save_hf(cfg, params, os.path.join(d, "hf"), hidrop_code=False)
        model = LlavaForConditionalGeneration.from_pretrained(
            os.path.join(d, "hf"), attn_implementation="sdpa", dtype=tdtype).to(device).eval()
    one, _ = prompt(cfg, a)
    batch = {k: np.asarray(v) for k, v in one._asdict().items() if v is not None}
    ids, mask, cols = expand_image_tokens(batch, cfg.model.image_token_id, schedule_of(cfg).n_vision)
    ids, mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    px = torch.tensor(np.asarray(one.pixels).transpose(0, 3, 1, 2), device=device, dtype=tdtype)

    def prefill(keep=1):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True, logits_to_keep=keep)
        sync()
        return out

    prefill_s = speed.timed(prefill, a.repeats)
    full = prefill(0).logits.float().cpu().numpy()
    ours = np.asarray(jax.jit(lambda p, x: forward(cfg, p, x))(params, one))  # default device
    state = prefill()
    cache, tok, m = state.cache, state.logits[:, -1].argmax(-1, keepdim=True), mask
    times = []
    for i in range(a.new_tokens):
        m = torch.cat([m, torch.ones_like(tok)], 1)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=tok, attention_mask=m, position_ids=m.sum(1, keepdim=True) - 1,
                        cache=cache, use_cache=True)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
        cache, tok = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    res = dict(device=device, dtype=a.dtype, torch_version=torch.__version__, threads=torch.get_num_threads(),
               prefill_s=prefill_s, decode_tokens_per_s=1.0 / statistics.median(times),
               prefill_logits_vs_ours=compare(ours, full[:, cols[0]]))
    print(f"  {res}", flush=True)
    del model
    return res


# ----------------------------------------------------------------------------- report

def table(res) -> str:
    rows = res["schedules"]
    v = next((r for r in rows if r["schedule"] == "vanilla"), None)
    lines = [f"{res['device_kind']} ({res['platform']}; peak {res['peak_tflops']} TFLOP/s bf16): "
             f"{res['layers']} layers × {res['width']}, CLIP {res['vision_layers']} × {res['vision_width']}, "
             f"576 vision tokens, T={res['text_len']}, train batch {res['batch']}, {res['dtype']}; "
             f"medians of {res['repeats']}", "",
             "| schedule | mean vis. tok. | train step (s) | speedup | tokens/s | model TFLOP/s | MFU "
             "| prefill (s) | speedup | decode (tok/s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['schedule']} | skipped: {r['skipped']} |||||||||")
            continue
        mfu = "—" if r["train_mfu"] is None else f"{r['train_mfu']:.1%}"
        lines.append(
            f"| {r['schedule']} | {r['mean_vision_tokens']:.0f} | {r['train_step_s']:.4f} "
            f"| {v['train_step_s'] / r['train_step_s']:.2f}× | {r['train_tokens_per_s']:.0f} "
            f"| {r['train_model_tflops_per_s']:.3g} | {mfu} | {r['prefill_s']:.4f} "
            f"| {v['prefill_s'] / r['prefill_s']:.2f}× | {speed.rate(r['decode_tokens_per_s'])} |")
    t = res.get("torch", {})
    if "prefill_s" in t and v:
        lines += ["", f"PyTorch {t['torch_version']} sdpa on {t['device']}: prefill {t['prefill_s']:.4f} s "
                      f"(ours / torch {v['prefill_s'] / t['prefill_s']:.2f}), decode "
                      f"{t['decode_tokens_per_s']:.1f} tok/s (ours / torch "
                      f"{speed.rate(v['decode_tokens_per_s'] and v['decode_tokens_per_s'] / t['decode_tokens_per_s'], 2)}); "
                      "prefill logits vs ours "
                      f"{t['prefill_logits_vs_ours']}"]
    for k in ("parity", "fused_attention", "torch"):
        if "skipped" in res.get(k, {}):
            lines.append(f"{k}: skipped ({res[k]['skipped']})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the CPU smoke sizes (the default on a CPU)")
    for name in DEVICE_SIZES:  # unset: the device's sizes, or the smoke sizes (--small, any CPU)
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"default {DEVICE_SIZES[name]} ({SMALL_SIZES[name]} with --small)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no schedule is started that would end past this many seconds")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype of the schedules and PyTorch (default: bfloat16 on a GPU or "
                         "TPU, float32 on a CPU); parity runs both")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=1, help="PyTorch's CPU threads (CPU runs only)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    unknown = [n for n in a.schedules.split(",") if n not in PRESETS]
    if unknown:  # before minutes of setup on a lent device
        ap.error(f"--schedules {a.schedules!r}: {unknown} unknown; allowed: {', '.join(PRESETS)}")
    t_start = time.time()
    dev = jax.devices()[0]
    platform = dev.platform
    host = jax.devices("cpu")[0]
    a.small = a.small or platform == "cpu"
    for name, value in (SMALL_SIZES if a.small else DEVICE_SIZES).items():
        if getattr(a, name) is None:  # what the user gave is kept
            setattr(a, name, value)
    a.dtype = a.dtype or ("float32" if platform == "cpu" else "bfloat16")
    peak = perf.peak_tflops([dev])
    print(f"{dev.device_kind} ({platform}), peak {peak} TFLOP/s; budget {a.budget_s:.0f} s", flush=True)
    res = dict(platform=platform, device_kind=dev.device_kind, chip=perf.chip_name(dev.device_kind),
               peak_tflops=peak, small=a.small, layers=a.layers, width=a.width, vision_layers=a.vision_layers,
               vision_width=a.vision_width, vocab=a.vocab, text_len=a.text_len, batch=a.batch,
               new_tokens=a.new_tokens, repeats=a.repeats, dtype=a.dtype, jax_version=jax.__version__, budget_s=a.budget_s)
    print("1. parity with the CPU", flush=True)
    try:
        res["parity"] = parity(a, host, dev, platform)
    except Exception as e:  # noqa: BLE001 (record it; go on to the timings)
        res["parity"] = _error(e)
    params = jax.device_get(init_params(bench_config(a), jax.random.PRNGKey(0)))
    print("2. fused attention", flush=True)
    try:
        res["fused_attention"] = fused_attention(a, params, dev, platform)
    except Exception as e:  # noqa: BLE001
        res["fused_attention"] = _error(e)
    print("3. schedules", flush=True)
    names, rows, last = a.schedules.split(","), [], 0.0
    for i, name in enumerate(names):
        elapsed = time.time() - t_start
        if i and elapsed + last > a.budget_s:  # the first (the baseline, before PyTorch) always runs
            rows.append(dict(schedule=name, skipped=f"budget: {elapsed:.0f} s spent, the last schedule took "
                                                     f"{last:.0f} s, budget {a.budget_s:.0f} s"))
            print(f"  {name}: {rows[-1]['skipped']}", flush=True)
            continue
        t0 = time.time()
        rows.append(measure_schedule(name, a, params, dev, peak))
        last = time.time() - t0
        r = rows[-1]
        print(f"  {name}: train {r['train_step_s']:.4f} s, prefill {r['prefill_s']:.4f} s, decode "
              f"{speed.rate(r['decode_tokens_per_s'])} tok/s ({last:.0f} s)", flush=True)
        if i == 0:
            print("4. PyTorch on the same device", flush=True)
            if a.no_torch:
                res["torch"] = skipped("--no-torch")
            else:
                try:
                    res["torch"] = torch_same_device(a, params, platform)
                except Exception as e:  # noqa: BLE001
                    res["torch"] = _error(e)
            print("3. schedules (continued)", flush=True)
    res["schedules"] = rows
    res["seconds"] = time.time() - t_start
    print(table(res))
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"accelerator-{platform}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    print(f"\n{res['seconds']:.0f} s; written to {out}")
    return res


if __name__ == "__main__":
    main()
