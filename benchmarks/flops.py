"""FLOPs of the LLaVA prefill under HiDrop schedules: XLA's cost analysis vs the paper's formula.

    python benchmarks/flops.py                                   # LLaVA-1.5-7B, T=64
    python benchmarks/flops.py --config configs/llava15_13b.py --text-len 128 --out /tmp/f.json
    python benchmarks/flops.py --config configs/qwen2_5_vl_7b.py --out /tmp/q.json  # Qwen2.5-VL

Nothing is allocated: the prefill is lowered from `abstract_params` and ShapeDtypeStruct inputs
and compiled for the host, and `compiled.cost_analysis()['flops']` is read. Every `nn.scan` is
unrolled (`unroll=True`), because XLA counts a scan body once, not once per layer (DESIGN §4).
The counts are machine-independent (they depend on shapes and the HLO, not on the CPU).

Definitions (batch 1, T text tokens, one 576-token image; L decoder layers; n_l = vision tokens in
0-based layer l from the schedule; d = hidden size, m = MLP size):

* F(n) = 4nd² + 2n²d + 3ndm, the paper's per-layer cost of n tokens. It counts multiply-adds
  (MACs): the paper's "3.82 TFLOPs" for vanilla 7B is Σ_l F(576) in MACs. XLA counts a
  multiply-add as 2 FLOPs, so every XLA figure below is divided by 2 to be in the paper's unit
  ("T" = 10¹² MACs). Elementwise ops (norms, RoPE, softmax, SiLU) count 1 XLA FLOP each, so
  they appear at half weight after the division; they are < 0.3% of a layer at 7B sizes.
* XLA vision = [XLA(prefill with image, schedule) − XLA(same prompt, no image)] / 2
               − XLA(vision tower + projector) / 2.
  The no-image prefill (pixels=None, has_image=False) runs the T text tokens through all L layers
  and the same LM head, so the difference is everything the image adds to the decoder: the
  layers' work on the vision tokens, including the text↔vision attention cross terms, plus the
  cuts (scoring, top-k, gathers, gates), position tables and masks. The vision tower and
  projector run once per image for every schedule: they are counted separately (own row).
* formula   = Σ_l [F(n_l + T) − F(T)]: the paper's formula applied to the decoder with and
  without the image. It includes the cross terms 4·n_l·T·d of attention; it is the figure XLA
  vision should match if the pruning machinery adds no hidden compute.
* scoring   = the net cost of the cuts: XLA of `score_vision` + `select` (hard top-k) lowered
  alone at each cut's shapes (T + n tokens entering, one query row), / 2, minus the keys of the
  T + k surviving tokens, which the next layer reuses instead of projecting again. Analytic net
  cost per cut: (n−k)·d·d_kv (keys of the dropped tokens, needed to score them) + d² (q_proj
  of the query row) + (T+n)·d (one row of logits) MACs; the paper's formula has no term for it.
* layers    = XLA vision − scoring: the decoder layers' work on the vision tokens plus the
  remaining pruning overhead (gathers, gates, masks, RoPE tables).
* paper formula = Σ_l F(n_l): vision tokens alone, no text (the paper's definition; what its
  3.82 / 1.78 / 0.42 TFLOPs are).

The goal: XLA vision within 3% of the formula for every HiDrop schedule. The table prints both
ratios (XLA vision / formula and layers / formula), so a miss shows whether it is the scoring.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hidrop_jax.config import feature_layers_run, n_vision_tokens, schedule_of  # noqa: E402
from hidrop_jax.families import family, family_name  # noqa: E402
from hidrop_jax.hidrop.schedule import Schedule, vision_flops  # noqa: E402
from hidrop_jax.hidrop.select import score_vision, select  # noqa: E402
from hidrop_jax.model import Inputs, abstract_params, encode_image, forward, text_dims  # noqa: E402
from hidrop_jax.layers.rope import rope_tables  # noqa: E402

SCHEDULES = ("vanilla", "pdrop", "tok80", "tok64", "tok48")
HIDROP = ("tok80", "tok64", "tok48", "mobilellama")
PAPER_TFLOPS = {"vanilla": 3.82, "pdrop": 1.78, "tok64": 0.42}  # LLaVA-1.5-7B, over vision tokens
TOLERANCE = 0.03
SDS = jax.ShapeDtypeStruct


# ----------------------------------------------------------------------------- config

def load_config(spec: str, arg: str = ""):
    """`path/to/config.py[:arg]` -> get_config(arg joined with `arg`)."""
    path, _, base = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("_flops_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(",".join(filter(None, [base, arg])))


# ----------------------------------------------------------------------------- counting

def xla_flops(fn, *args, compile: bool = True) -> float:
    """XLA's FLOP count of `jax.jit(fn)(*args)` for abstract args (nothing allocated)."""
    lowered = jax.jit(fn).lower(*args)
    ca = lowered.compile().cost_analysis() if compile else lowered.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax returned one dict per device
        ca = ca[0]
    return float(ca["flops"])


def abstract_pixels(cfg, batch: int):
    """LLaVA: images [B, H, W, C]; Qwen2.5-VL: the processor's patches [B, S, C·T·P·P]."""
    return SDS((batch, *family(cfg.model).pixels_shape(cfg.model)), jnp.float32)


def abstract_inputs(cfg, batch: int, text_len: int, image: bool) -> Inputs:
    rope = {}
    if family(cfg.model).rope_rows is not None:  # M-RoPE rows, with or without the image
        rope = dict(text_rope=SDS((batch, 3, text_len), jnp.int32),
                    vision_rope=SDS((batch, 3, n_vision_tokens(cfg.model)), jnp.int32))
    return Inputs(
        text_ids=SDS((batch, text_len), jnp.int32), text_pos=SDS((batch, text_len), jnp.int32),
        text_valid=SDS((batch, text_len), jnp.bool_), image_slot=SDS((batch,), jnp.int32),
        has_image=SDS((batch,), jnp.bool_),
        pixels=abstract_pixels(cfg, batch) if image else None, **rope)


def prefill_flops(cfg, params, text_len: int, image: bool, batch: int = 1, compile: bool = True):
    return xla_flops(lambda p, x: forward(cfg, p, x), params,
                     abstract_inputs(cfg, batch, text_len, image), compile=compile)


def tower_flops(cfg, params, batch: int = 1, compile: bool = True):
    return xla_flops(lambda p, x: encode_image(cfg.model, p, x), params, abstract_pixels(cfg, batch),
                     compile=compile)


def cut_flops(cfg, params, n_in: int, k: int, text_len: int, batch: int = 1,
              compile: bool = True) -> float:
    """XLA FLOPs of one cut's scoring + selection alone: `n_in` vision tokens enter, `k` stay."""
    td = text_dims(cfg.model)
    s = schedule_of(cfg)
    layer = jax.tree.map(lambda p: SDS(p.shape[1:], p.dtype), params["text"]["layers"])
    S = text_len + n_in

    def cut(lp, x, pos, valid, alive, q_idx, q_valid):
        rope = rope_tables(pos, td.head_dim, td.rope_theta)
        scores, k_raw = score_vision(td, lp, x, rope, pos, valid, q_idx, q_valid, text_len)
        return select(scores, alive, k, s.selection, s.temperature), k_raw

    return xla_flops(cut, layer, SDS((batch, S, td.hidden_size), td.dtype),
                     SDS((batch, S), jnp.int32), SDS((batch, S), jnp.bool_),
                     SDS((batch, n_in), jnp.bool_), SDS((batch, 1), jnp.int32),
                     SDS((batch, 1), jnp.bool_), compile=compile) - _rope_flops(td, batch, S, compile)


def _rope_flops(td, batch, S, compile):
    """The RoPE tables `cut` builds for itself (the model builds them once per stage anyway)."""
    return xla_flops(lambda pos: rope_tables(pos, td.head_dim, td.rope_theta),
                     SDS((batch, S), jnp.int32), compile=compile)


# ----------------------------------------------------------------------------- formulas

def paper_layer_macs(n: int, d: int, m: int) -> float:
    """The paper's per-layer cost of n tokens, 4nd² + 2n²d + 3ndm (multiply-adds), written out
    here rather than imported so the benchmark checks the library's formula too."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def formula_macs(tokens_per_layer, d: int, m: int, text_len: int) -> float:
    """Σ_l [F(n_l + T) − F(T)]: what the image adds to the decoder, cross terms included."""
    F = paper_layer_macs
    return sum(F(n + text_len, d, m) - F(text_len, d, m) for n in tokens_per_layer)


def scoring_formula_macs(n_in: int, k: int, text_len: int, d: int, d_kv: int) -> float:
    """Net MACs of one cut: the dropped tokens' keys, the query row's q_proj, one logits row."""
    return (n_in - k) * d * d_kv + d * d + (text_len + n_in) * d


def reused_key_macs(k: int, text_len: int, d: int, d_kv: int) -> float:
    """Keys scoring computes and the next layer reuses (it would have projected them anyway)."""
    return (text_len + k) * d * d_kv


def tower_formula_macs(cfg) -> float:
    """CLIP layers run for the feature layer (4ND² + 2N²D + 2NDM each, N = patches + CLS), the
    patch embedding, and the 2-layer projector over the vision tokens."""
    v, t = cfg.model.vision, cfg.model.text
    if family_name(cfg.model) != "llava":
        return qwen_tower_formula_macs(cfg)
    N = (v.image_size // v.patch_size) ** 2 + 1
    D, M = v.hidden_size, v.intermediate_size
    layers = feature_layers_run(cfg.model) * (4 * N * D * D + 2 * N * N * D + 2 * N * D * M)
    patch = (N - 1) * v.patch_size ** 2 * v.num_channels * D
    n_vis = n_vision_tokens(cfg.model)
    return layers + patch + n_vis * (D * t.hidden_size + t.hidden_size * t.hidden_size)


def qwen_tower_formula_macs(cfg) -> float:
    """Qwen2.5-VL's ViT at the config's grid (S patches, D wide, M MLP): patch embedding
    S·(C·T·P²)·D; per block qkv + proj 4SD², SwiGLU 3SDM, attention 2·S·S_a·D with S_a = S
    (full blocks) or the patches of a window (windowed blocks; edge windows counted as they
    are); the merger (4D → 4D → d on the S/4 merged tokens)."""
    v, d = cfg.model.vision, cfg.model.text.hidden_size
    gh, gw = (s // v.patch_size for s in v.image_size)
    S, D, M, u = gh * gw, v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    n = v.window_size // v.spatial_merge_size // v.patch_size  # window side, merged tokens
    mh, mw = gh // v.spatial_merge_size, gw // v.spatial_merge_size
    sides = lambda g: [min(n, g - a) for a in range(0, g, n)]  # noqa: E731
    windows = sum((a * b * u) ** 2 for a in sides(mh) for b in sides(mw))
    full = len(v.fullatt_block_indexes)
    attn = 2 * D * (full * S * S + (v.depth - full) * windows)
    patch = S * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * D
    return patch + v.depth * (4 * S * D * D + 3 * S * D * M) + attn + S // u * (u * D * u * D + u * D * d)


def cuts(s: Schedule):
    """[(tokens entering, tokens kept)] for each cut of the schedule."""
    ins = [s.n_vision, *s.keep[:-1]]
    return list(zip(ins, s.keep))


# ----------------------------------------------------------------------------- benchmark

def measure(config: str, schedules, text_len: int, compile: bool = True) -> dict:
    t0 = time.time()
    base = load_config(config, "unroll=True")
    params = abstract_params(base)
    t = base.model.text
    d, m, d_kv = t.hidden_size, t.intermediate_size, t.num_kv_heads * t.head_dim
    if t.num_kv_heads != t.num_heads:
        print(f"note: grouped-query attention ({t.num_kv_heads} of {t.num_heads} heads): the paper's "
              "4nd² assumes full K/V projections, so XLA will count less than the formula")
    text_only = prefill_flops(base, params, text_len, image=False, compile=compile)
    tower = tower_flops(base, params, compile=compile)
    shown = os.path.relpath(config, ROOT) if os.path.abspath(config).startswith(ROOT) else config
    out = dict(config=shown, text_len=text_len, batch=1, d=d, m=m, num_layers=t.num_layers,
               n_vision=n_vision_tokens(base.model), unit="1e12 multiply-adds (XLA flops / 2)",
               text_only_prefill=text_only / 2e12,
               vision_tower=dict(xla=tower / 2e12, formula=tower_formula_macs(base) / 1e12),
               schedules={})
    for name in schedules:
        cfg = load_config(config, f"schedule={name},unroll=True")
        s = schedule_of(cfg)
        tpl = s.tokens_per_layer()
        full = prefill_flops(cfg, params, text_len, image=True, compile=compile)
        vision = (full - text_only - tower) / 2
        cut_rows = [dict(n_in=n, keep=k, xla=cut_flops(cfg, params, n, k, text_len, compile=compile) / 2
                         - reused_key_macs(k, text_len, d, d_kv),
                         formula=scoring_formula_macs(n, k, text_len, d, d_kv)) for n, k in cuts(s)]
        scoring = sum(c["xla"] for c in cut_rows)
        formula = formula_macs(tpl, d, m, text_len)
        paper_formula = sum(paper_layer_macs(n, d, m) for n in tpl)
        out["schedules"][name] = dict(
            tokens_per_layer=tpl, mean_tokens=s.mean_tokens(),
            prefill_xla=full / 2e12, xla_vision=vision / 1e12, formula=formula / 1e12,
            ratio=vision / formula, scoring_xla=scoring / 1e12,
            scoring_formula=sum(c["formula"] for c in cut_rows) / 1e12,
            layers_ratio=(vision - scoring) / formula, cuts=[
                {**c, "xla": c["xla"] / 1e12, "formula": c["formula"] / 1e12} for c in cut_rows],
            paper_formula=paper_formula / 1e12,
            paper=PAPER_TFLOPS.get(name) if family_name(base.model) == "llava" else None,
            library_formula_agrees=abs(vision_flops(s, d, m) - paper_formula) < 1,
            within_tolerance=abs(vision / formula - 1) <= TOLERANCE)
    v = out["schedules"].get("vanilla")
    for row in out["schedules"].values():
        if v:
            row["vs_vanilla_xla"] = row["xla_vision"] / v["xla_vision"]
            row["vs_vanilla_paper_formula"] = row["paper_formula"] / v["paper_formula"]
    out["seconds"] = time.time() - t0
    return out


def table(res: dict) -> str:
    f = lambda x: "—" if x is None else f"{x:.3f}"
    p = lambda x: "—" if x is None else f"{x:.2f}"
    lines = [
        f"{res['config']}, batch 1, T={res['text_len']} text + {res['n_vision']} vision tokens, "
        f"{res['num_layers']} layers; T = 1e12 multiply-adds (XLA flops / 2)",
        "",
        "| schedule | mean vis. tok. | XLA vision (T) | formula Σ[F(n+T)−F(T)] (T) | XLA / formula "
        "| scoring (T) | (XLA − scoring) / formula | paper formula ΣF(n) (T) | paper (T) "
        "| XLA vs vanilla | paper formula vs vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["schedules"].items():
        lines.append(
            f"| {name} | {r['mean_tokens']:.1f} | {f(r['xla_vision'])} | {f(r['formula'])} "
            f"| {r['ratio']:.4f} | {f(r['scoring_xla'])} | {r['layers_ratio']:.4f} "
            f"| {f(r['paper_formula'])} | {p(r['paper'])} | {f(r.get('vs_vanilla_xla'))} "
            f"| {f(r.get('vs_vanilla_paper_formula'))} |")
    vt = res["vision_tower"]
    lines.append(f"| vision tower + projector (every schedule) | — | {f(vt['xla'])} | {f(vt['formula'])} "
                 f"| {vt['xla'] / vt['formula']:.4f} | — | — | — | — | — | — |")
    lines.append(f"| text-only prefill (T tokens, all layers + LM head) | — | {f(res['text_only_prefill'])} "
                 "| — | — | — | — | — | — | — | — |")
    lines.append("")
    for name, r in res["schedules"].items():
        if name in HIDROP:
            verdict = "within" if r["within_tolerance"] else "NOT within"
            lines.append(f"{name}: XLA vision is {100 * (r['ratio'] - 1):+.2f}% vs the formula "
                         f"({verdict} {TOLERANCE:.0%}); scoring {r['scoring_xla']:.4f} T "
                         f"(analytic {r['scoring_formula']:.4f} T) = "
                         f"{100 * r['scoring_xla'] / r['formula']:.2f}% of the formula; "
                         f"without it {100 * (r['layers_ratio'] - 1):+.2f}%")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "llava15_7b.py"),
                    help="config file, optionally with an arg string: path.py[:dtype=bfloat16]")
    ap.add_argument("--text-len", type=int, default=64, help="text tokens in the prompt (T)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "flops.json"))
    ap.add_argument("--no-compile", action="store_true",
                    help="count the lowered (unoptimised) HLO instead of the compiled one")
    a = ap.parse_args(argv)
    res = measure(a.config, a.schedules.split(","), a.text_len, compile=not a.no_compile)
    print(table(res))
    print(f"\n{res['seconds']:.1f} s; written to {a.out}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
