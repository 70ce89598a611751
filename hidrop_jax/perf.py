"""Chip facts and the analytic FLOP count: what MFU is measured against (one home for both).

`hidrop_jax.aot` (compiled for a TPU slice this host does not have) and `hidrop_jax.train`
(each logging step on the devices it runs on) read the same table and the same count, so an
estimated MFU and a measured one compare like with like.

Model FLOPs (`model_flops`) follow the MFU convention (PaLM, MaxText): the work the model needs,
not what XLA executes (no remat recompute, no elementwise ops, no masked-out attention blocks).
"""

from __future__ import annotations

import dataclasses

from hidrop_jax.config import n_vision_tokens, schedule_of
from hidrop_jax.families import family

GiB = 2 ** 30
PROGRAMS = ("train", "forward", "prefill", "generate")


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_bf16: float   # FLOP/s per chip (dense bf16, no sparsity)
    hbm_bytes: int     # HBM per chip
    hbm_bw: float      # HBM bytes/s per chip


# TPU: the Cloud TPU system-architecture pages (TPU v4, v5e, v5p, Trillium/v6e): peak bf16
# 275 / 197 / 459 / 918 TFLOP/s; HBM 32 / 16 / 95 / 32 GiB; HBM bandwidth 1,200 / 819 / 2,765 /
# 1,640 GB/s. GPU: NVIDIA's A100, H100 and H200 datasheets, dense bf16 Tensor Core (the
# datasheets' larger figures assume 2:4 sparsity): A100 312 TFLOP/s, H100 SXM 989, H100 PCIe 756,
# H200 989; HBM 80 / 40 GB, 80, 80, 141 GB (the vendor's GB taken as 10⁹ bytes: a lower bound);
# bandwidth 2,039 (80 GB SXM) / 1,555 (40 GB), 3,350, 2,000, 4,800 GB/s.
CHIPS = {
    "v4": Chip(275e12, 32 * GiB, 1200e9),
    "v5e": Chip(197e12, 16 * GiB, 819e9),
    "v5p": Chip(459e12, 95 * GiB, 2765e9),
    "v6e": Chip(918e12, 32 * GiB, 1640e9),
    "a100-80gb": Chip(312e12, 80 * 10 ** 9, 2039e9),
    "a100-40gb": Chip(312e12, 40 * 10 ** 9, 1555e9),
    "h100-sxm": Chip(989e12, 80 * 10 ** 9, 3350e9),
    "h100-pcie": Chip(756e12, 80 * 10 ** 9, 2000e9),
    "h200": Chip(989e12, 141 * 10 ** 9, 4800e9),
}
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")  # what libtpu can describe (`aot --topology CHIP:...`)


def chip_name(device_kind: str):
    """`jax.devices()[0].device_kind` -> a CHIPS key, or None (CPU, or a chip not in the table:
    no guess, since a wrong peak makes a wrong MFU)."""
    k = " ".join(device_kind.lower().replace("-", " ").split())
    if k.startswith("tpu"):
        if k in ("tpu v4",):
            return "v4"
        if k in ("tpu v5 lite", "tpu v5e", "tpu v5litepod"):
            return "v5e"
        if k in ("tpu v5p", "tpu v5"):
            return "v5p"
        if k in ("tpu v6 lite", "tpu v6e", "tpu v6"):
            return "v6e"
        return None
    if "nvidia" not in k:
        return None
    if "h200" in k:
        return "h200"
    if "h100" in k:
        return "h100-pcie" if "pcie" in k else "h100-sxm" if ("sxm" in k or "hbm3" in k) else None
    if "a100" in k:
        return "a100-80gb" if "80gb" in k.replace(" ", "") else "a100-40gb"
    return None


def devices_per_chip(devices) -> int:
    """libtpu shows v4 as one device per TensorCore when it describes a slice (`aot`); a real
    v4, v5p (megacore) or GPU shows one device per chip."""
    return len({getattr(d, "core_on_chip", 0) for d in devices}) or 1


def device_chip(devices):
    """(chip name, the chip's figures per device) for these devices, or (None, None)."""
    name = chip_name(devices[0].device_kind)
    if name is None:
        return None, None
    c, cores = CHIPS[name], devices_per_chip(devices)
    return name, Chip(c.peak_bf16 / cores, c.hbm_bytes // cores, c.hbm_bw / cores)


# ----------------------------------------------------------------------------- the FLOP count

def decoder_layer_macs(n: int, t) -> float:
    """Multiply-adds of one decoder layer over n tokens: q/o projections n·d·(N·H) each, k/v
    n·d·(K·H) each (grouped-query), attention logits and values 2·n²·(N·H) (full, not
    causal-halved: what the masked kernels compute), SwiGLU 3·n·d·m. With N·H = K·H = d
    (LLaVA-1.5) this is the paper's F(n) = 4nd² + 2n²d + 3ndm."""
    q = t.num_heads * t.head_dim
    return n * _token_weight_macs(t) + 2 * n * n * q


def _token_weight_macs(t) -> float:
    """One token's multiply-adds with a decoder layer's weights (projections and MLP)."""
    d, q, kv = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return d * (2 * q + 2 * kv) + 3 * d * t.intermediate_size


def flops_parts(cfg) -> dict:
    """Multiply-adds per sample, by part: `llm` (decoder layers over the T = `data.max_len` text
    rows plus the vision tokens each layer holds under the HiDrop schedule), `head_row` (the
    LM head of one row), `tower`, `projector` (one image)."""
    s, t, T = schedule_of(cfg), cfg.model.text, cfg.data.max_len
    tower, proj = family(cfg.model).tower_macs(cfg.model)
    return dict(llm=sum(decoder_layer_macs(T + n, t) for n in s.tokens_per_layer()),
                head_row=t.hidden_size * t.vocab_size, tower=tower, projector=proj)


def train_multipliers(trainable: str) -> dict:
    """Forward passes' worth of work per part in a training step. A trained part costs 3 (its
    forward, the gradient of its input, the gradient of its weights); a frozen one 2 when a
    trained part lies before it (the gradient passes through: LLaVA stage 1's LLM), else 1
    (the frozen tower: never differentiated, `train.make_train_step`)."""
    order = ("vision", "projector", "text")  # input to loss
    on = {"projector": {"projector"}, "projector+llm": {"projector", "text"},
          "all": {"projector", "text", "vision"}}.get(trainable)
    if on is None:
        raise ValueError(f"config field `train.trainable` = {trainable!r} is not supported; "
                         "allowed: one of ('projector', 'projector+llm', 'all')")
    out = {}
    for i, part in enumerate(order):
        upstream = any(p in on for p in order[:i])
        out[part] = 3 if part in on else 2 if upstream else 1
    return out


def model_flops(cfg, program: str = "train", max_new_tokens: int = 0) -> float:
    """Analytic FLOPs (2 per multiply-add) of one step for the whole batch (`train.batch_size`
    rows of `data.max_len` text rows and one image each), from HiDrop's real per-layer token
    counts (`flops_parts`):

    forward   the training forward: every row's logits (what `model.forward` returns).
    train     the forward × `train_multipliers` (3× every trained part; no remat recompute).
    prefill   the forward scoring one row (the LM head of the last prompt token).
    generate  the prefill plus one decode token against the cache (the loop body XLA counts).
    """
    if program not in PROGRAMS:
        raise ValueError(f"program {program!r} is not supported; allowed: {PROGRAMS}")
    p, t = flops_parts(cfg), cfg.model.text
    T = cfg.data.max_len
    if program == "train":
        k = train_multipliers(cfg.train.trainable)
        macs = k["text"] * (p["llm"] + T * p["head_row"]) + k["projector"] * p["projector"] + k["vision"] * p["tower"]
    elif program == "forward":
        macs = p["llm"] + T * p["head_row"] + p["projector"] + p["tower"]
    else:
        macs = p["llm"] + p["head_row"] + p["projector"] + p["tower"]
        if program == "generate":  # one token through every layer's weights, and the LM head
            macs += t.num_layers * _token_weight_macs(t) + p["head_row"]
    return 2.0 * cfg.train.batch_size * macs


def tokens_per_step(cfg) -> int:
    """Sequence tokens one training step feeds the model, as the batch holds them: every row's
    `data.max_len` text rows (padding included) plus its image's vision tokens (also for rows
    without an image: their slots are in the batch, masked). The same for every schedule, so
    tokens/s compares schedules directly."""
    return cfg.train.batch_size * (cfg.data.max_len + n_vision_tokens(cfg.model))


def step_figures(cfg, n_devices: int, seconds_per_step: float, peak_tflops=None) -> dict:
    """The trainer's per-step figures, per device: tokens_per_s_per_device,
    model_tflops_per_s_per_device and (when the peak is known) mfu. Host arithmetic only."""
    dt = max(seconds_per_step, 1e-12)
    tflops = model_flops(cfg, "train") / n_devices / dt / 1e12
    out = dict(tokens_per_s_per_device=tokens_per_step(cfg) / n_devices / dt,
               model_tflops_per_s_per_device=tflops)
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out


def peak_tflops(devices, override=None):
    """TFLOP/s per device to measure MFU against: `override` (`train.peak_tflops`) if given,
    else the chip's dense bf16 peak, else None (CPU, unknown chips)."""
    if override:
        return float(override)
    _, chip = device_chip(devices)
    return None if chip is None else chip.peak_bf16 / 1e12

