"""Compile the production programs for a TPU slice this host does not have: memory, FLOPs, roofline.

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python -m hidrop_jax.aot \
        --config configs/llava15_7b.py:schedule=tok64,dtype=bfloat16,remat=full \
        --topology v5p:4x4x4 --program train [--config.train.mesh='(1,-1,1)' \
        --config.train.batch_size=128 --config.data.max_len=1472] [--max-batch] --out report.json

libtpu (the `tpu` extra) describes the slice (`jax.experimental.topologies.get_topology_desc`)
and the real TPU compiler compiles for it on this CPU host, as MaxText's `train_compile.py` does.
What is compiled is the program the runs execute, built by the same functions from abstract
parameters: `train.jit_train_step` over `train.abstract_state` (optimizer, shardings and rules
as `train.train`), `generate.prefill`, and `generate.compiled` (prefill + decode loop). The batch
is `train.batch_size` global rows of `data.max_len` text rows (+ one image each).

Reported per device (JSON, field names stable):
  bytes_per_device  argument / output / temp / alias bytes from the compiler's memory analysis;
                    total = argument + output + temp − alias (donated state is counted once)
  fits              the compiler compiled it within the chip's HBM (`compiler_fits`) and the
                    total is within `hbm_bytes_per_device`: libtpu accepted a v5e program
                    whose total was 16.14 GiB of the chip's 16 (7B stage 2, 9 rows per chip),
                    so its verdict alone is not taken. A program that does not fit is
                    compiled again with `xla_tpu_no_crash_on_oom` to get its figures.
  attention_impl    the attention that was compiled (`model.attention_impl`; None resolves to
                    the TPU default, the Pallas flash kernel).
  flops_per_device  the FLOPs of the program with every layer scan unrolled (`model.scan_unroll`;
                    XLA counts a loop body once, DESIGN §4), remat recompute included, divided
                    by the device count. `flops_source` says how they were counted:
                    "host" (default, seconds): the unrolled program lowered for one CPU device
                    with XLA attention, costed before optimization (within 1% of libtpu's
                    count on the test model); "tpu" (`--flops=tpu`, up to an hour at 7B): the
                    unrolled program compiled by libtpu for the slice, which also gives
  bytes_accessed_per_device
                    (None from "host": bytes before fusion mean nothing). The decode
                    `while_loop` of `generate` is counted once: generate = prefill + one step.
  est_step_s        roofline: max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth),
                    the FLOPs term alone from "host"; ICI collectives and host input are not
                    modelled, so it is a lower bound.
  est_mfu           model FLOPs (analytic, `perf.model_flops`: no remat, 3× the forward of
                    every trained part when training) per device / (est_step_s × peak).
With --max-batch the report is that of the largest batch that fits (`max_batch`), plus
  max_batch_per_device   that batch (0: not even one row fits; the report is then batch 1's)
  max_batch_probes       every batch compiled on the way: fits, compile_s, temp and fixed bytes
The chip table (peak bf16, HBM, bandwidth) is `hidrop_jax.perf.CHIPS`, which the trainer's MFU
also reads.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # never ask a metadata server: no TPU here
# other processes on this host may hold /tmp/libtpu_lockfile (any JAX started without
# JAX_PLATFORMS=cpu takes it); compiling needs no exclusive TPU
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only compiled for, never used

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


from hidrop_jax import generate as gen_lib  # noqa: E402
from hidrop_jax.perf import CHIPS, TPU_CHIPS, Chip, devices_per_chip, model_flops  # noqa: E402
from hidrop_jax import sharding as shard_lib  # noqa: E402
from hidrop_jax import train as train_lib  # noqa: E402
from hidrop_jax.config import n_vision_tokens, schedule_of  # noqa: E402
from hidrop_jax.families import family  # noqa: E402
from hidrop_jax.batch import Inputs, Targets  # noqa: E402
from hidrop_jax.layers.attention import resolve as resolve_attention  # noqa: E402
from hidrop_jax.model import abstract_params  # noqa: E402

PROGRAMS = ("train", "prefill", "generate")
FLOPS = ("host", "tpu", "none")  # how `flops_per_device` is counted (module docstring)
GiB = 2 ** 30


OOM_OPTIONS = {"xla_tpu_no_crash_on_oom": True}


# ----------------------------------------------------------------------------- topology & mesh

def topology_devices(topology: str):
    """'v5p:4x4x4' -> (chip name, the slice's TPU devices), from libtpu's description."""
    chip, sep, shape = topology.partition(":")
    if chip not in TPU_CHIPS or not sep or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ValueError(f"--topology {topology!r} is not supported; allowed: CHIP:AxB or CHIP:AxBxC "
                         f"with CHIP one of {TPU_CHIPS} (e.g. v5p:4x4x4, v5e:8x8)")
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except ImportError:
        raise
    except Exception as e:  # libtpu's own refusal (e.g. a shape that no slice has)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--topology {topology!r}: libtpu rejects it ({first}); allowed: a slice "
                         f"shape of that chip, e.g. v5p:2x2x1, v5p:4x4x4, v4:4x4x4, v5e:2x2, v5e:8x8, "
                         f"v6e:8x8") from None
    return chip, list(desc.devices)


def topology_mesh(cfg, devices):
    """`train.make_mesh`'s (data, fsdp, tensor) mesh over the slice's devices."""
    try:
        return shard_lib.make_mesh(tuple(cfg.train.mesh), devices)
    except ValueError as e:
        raise ValueError(f"config.train.mesh = {tuple(cfg.train.mesh)} does not fit the "
                         f"{len(devices)} devices of the topology ({e}); allowed: three sizes "
                         f"whose product is {len(devices)}, at most one of them -1") from None


def data_parallel(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


# ----------------------------------------------------------------------------- abstract inputs

def abstract_batch(cfg, mesh, *, targets: bool):
    """(Inputs, Targets | None) of ShapeDtypeStructs as `train.device_batch` makes them:
    `train.batch_size` rows sharded over data × fsdp, shapes as `data.pipeline` documents."""
    B, T, Q = cfg.train.batch_size, cfg.data.max_len, cfg.data.num_queries
    sh = shard_lib.batch_sharding(mesh)
    a = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
    i32, b1 = jnp.int32, jnp.bool_
    f = family(cfg.model)
    extra = dict(pixels=a((B, *f.pixels_shape(cfg.model)), jnp.float32))
    if f.rope_rows is not None:  # rotary rows (M-RoPE: t, h, w) beside the order
        N = n_vision_tokens(cfg.model)
        extra.update(text_rope=a((B, 3, T), i32), vision_rope=a((B, 3, N), i32))
    inputs = Inputs(text_ids=a((B, T), i32), text_pos=a((B, T), i32), text_valid=a((B, T), b1),
                    image_slot=a((B,), i32), has_image=a((B,), b1), **extra)
    if not targets:
        return inputs, None
    inputs = inputs._replace(query_idx=a((B, Q), i32), query_valid=a((B, Q), b1))
    return inputs, Targets(a((B, T), i32), a((B, T), b1), a((B, T), i32), a((B, Q), i32), a((B,), b1))


def sharded_params(cfg, mesh):
    params = abstract_params(cfg)
    shardings = shard_lib.param_shardings(cfg, mesh)
    return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings)


def on_platform(cfg, platform: str):
    """`cfg` with `model.attention_impl` resolved for the target `platform`: None means the
    default of the chips compiled for (the Pallas kernel on TPU), not of this CPU host."""
    c = copy.deepcopy(cfg)
    c.model.attention_impl = resolve_attention(cfg.model.get("attention_impl"), platform)
    return c


def program(cfg, mesh, name: str, max_new_tokens: int):
    """(jitted function, abstract args): the production program `name` on `mesh`."""
    cfg = on_platform(cfg, mesh.devices.flat[0].platform)
    if name == "train":
        tx, _ = train_lib.make_optimizer(cfg.train, abstract_params(cfg))
        state = train_lib.abstract_state(cfg, mesh, tx)
        step = train_lib.jit_train_step(cfg, tx, jax.tree.map(lambda x: x.sharding, state))
        return step, (state, *abstract_batch(cfg, mesh, targets=True))
    params = sharded_params(cfg, mesh)
    inputs, _ = abstract_batch(cfg, mesh, targets=False)
    if name == "prefill":
        fn = jax.jit(functools.partial(gen_lib.prefill, cfg, max_new_tokens=max_new_tokens))
        return fn, (params, inputs)
    if name == "generate":
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        s = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
        fn = gen_lib.compiled(cfg.to_json(), max_new_tokens, False)  # greedy, as generate() runs it
        return fn, (params, inputs, s(jnp.int32), s(jnp.int32), s(jnp.float32), s(jnp.float32),
                    s(jnp.uint32, (2,)))
    raise ValueError(f"--program {name!r} is not supported; allowed: {PROGRAMS}")


# ----------------------------------------------------------------------------- compile & measure

def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


LAST_OOM = {}  # the compiler's message of the last program that did not fit (see compile_program)


@contextlib.contextmanager
def _without_persistent_cache():
    """An executable compiled for a slice this host does not have cannot be loaded back from
    JAX's persistent cache (JAX_COMPILATION_CACHE_DIR, as clusters, the test suite and
    `train.compile_cache` set it): it would warn and compile again, and `compile_s` must be the
    compiler's time. JAX decides once per process whether to use the cache, at the first
    compile after a reset, so the setting alone does nothing once something has compiled: the
    cache is reset on the way in and out."""
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def compile_program(fn, args, *, retry_oom: bool = True):
    """(compiled or None, fits, seconds). A program over HBM is compiled again with
    `xla_tpu_no_crash_on_oom` so its figures can still be read (if `retry_oom`; slow at 7B:
    the compiler then keeps trying to fit). The compiler's own message is kept in `LAST_OOM`.
    Lowered under the arguments' mesh, as `train.train` does (the Pallas attention's
    `shard_map`)."""
    t0 = time.time()
    meshes = [x.sharding.mesh for x in jax.tree.leaves(args) if getattr(x, "sharding", None) is not None]
    with jax.set_mesh(meshes[0]):
        lowered = fn.lower(*args)
    with _without_persistent_cache():
        try:
            return lowered.compile(), True, time.time() - t0
        except Exception as e:  # noqa: BLE001 (jax raises JaxRuntimeError; its home moves between versions)
            if not _is_oom(e):
                raise
            LAST_OOM.clear()
            LAST_OOM.update(message=str(e)[:4000], required_bytes=_required_bytes(str(e)))
        if not retry_oom:
            return None, False, time.time() - t0
        return lowered.compile(compiler_options=OOM_OPTIONS), False, time.time() - t0


def _required_bytes(message: str):
    """'... memory required for HLO temporaries (24.00G) exceeds available HBM (15.75G)' -> bytes."""
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds available", message)
    return None if not m else int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1))


def memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    out = dict(argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes,
               temp=ma.temp_size_in_bytes, alias=ma.alias_size_in_bytes)
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    out["code"] = ma.generated_code_size_in_bytes
    return out


def cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return ca


def unrolled(cfg):
    """The same config with every layer scan unrolled (for the compiler's FLOP count)."""
    c = copy.deepcopy(cfg)
    c.model.scan_unroll = True
    if "arg" in c:
        c.arg.unroll = True
    return c


def host_flops(cfg, program_name: str, max_new_tokens: int) -> float:
    """Global FLOPs of `program_name`, unrolled, lowered for one CPU device and costed before
    optimization: seconds where libtpu needs up to an hour to compile the unrolled 7B step.
    XLA attention stands in for a kernel: the same matmuls (libtpu counts the Pallas kernel by
    its cost estimate, which includes the padding of short sequences to its blocks)."""
    c = unrolled(cfg)
    c.model.attention_impl = "xla"
    mesh = shard_lib.make_mesh((1, 1, 1), jax.devices("cpu")[:1])
    fn, args = program(c, mesh, program_name, max_new_tokens)
    with jax.set_mesh(mesh):
        ca = fn.lower(*args).cost_analysis()
    return float(ca["flops"])


def _check_flops(how: str):
    if how not in FLOPS:
        raise ValueError(f"--flops {how!r} is not supported; allowed: {FLOPS}")


def device_spec(chip: str, devices) -> Chip:
    """The chip table's figures per device: libtpu describes v4 as two devices per chip (one per
    TensorCore, no megacore), each with half the chip's HBM, FLOP/s and bandwidth."""
    cores = devices_per_chip(devices)
    c = CHIPS[chip]
    return Chip(c.peak_bf16 / cores, c.hbm_bytes // cores, c.hbm_bw / cores)


def flops_fields(cfg, mesh, program_name: str, max_new_tokens: int, how: str, spec: Chip) -> dict:
    """flops_per_device, bytes_accessed_per_device, est_step_s, est_mfu... (module docstring),
    the FLOPs counted `how` (one of FLOPS)."""
    _check_flops(how)
    mf = model_flops(cfg, program_name, max_new_tokens) / mesh.devices.size
    out = dict(flops_per_device=None, bytes_accessed_per_device=None, est_step_s=None, est_mfu=None,
               model_flops_per_device=mf)
    if how == "none":
        return out
    t0 = time.time()
    if how == "host":
        f, b = host_flops(cfg, program_name, max_new_tokens) / mesh.devices.size, None
    else:
        ca = cost(compile_program(*program(unrolled(cfg), mesh, program_name, max_new_tokens))[0])
        f, b = float(ca["flops"]), float(ca["bytes accessed"])
    t_flops = f / spec.peak_bf16
    est = t_flops if b is None else max(t_flops, b / spec.hbm_bw)
    out.update(flops_per_device=f, bytes_accessed_per_device=b, flops_source=how,
               flops_compile_s=round(time.time() - t0, 2), est_step_s=est,
               est_mfu=mf / (est * spec.peak_bf16) if est > 0 else None,
               compute_bound=None if b is None else t_flops >= b / spec.hbm_bw)
    return out


def report(cfg, topology: str, program_name: str, *, max_new_tokens: int = 32,
           flops: str = "host", chip_devices=None, retry_oom: bool = True) -> dict:
    """Compile `program_name` for `topology`; -> the JSON report (see the module docstring).
    `flops`: one of FLOPS."""
    chip, devices = chip_devices or topology_devices(topology)
    mesh = topology_mesh(cfg, devices)
    dp = data_parallel(mesh)
    if cfg.train.batch_size % dp:
        raise ValueError(f"config.train.batch_size = {cfg.train.batch_size} is not divisible by "
                         f"data × fsdp = {dp} of mesh {dict(mesh.shape)}; allowed: multiples of {dp}")
    cores = devices_per_chip(devices)
    spec = device_spec(chip, devices)
    attn = resolve_attention(cfg.model.get("attention_impl"), devices[0].platform)
    compiled, fits, compile_s = compile_program(*program(cfg, mesh, program_name, max_new_tokens),
                                                retry_oom=retry_oom)
    if compiled is None:  # over HBM and not compiled again: the compiler's message is the figure
        return dict(topology=topology, chip=chip, devices=len(devices), chips=len(devices) // cores,
                    mesh=dict(mesh.shape), program=program_name, schedule=cfg.hidrop.name, attention_impl=attn,
                    batch_per_device=cfg.train.batch_size // dp, max_len=cfg.data.max_len,
                    remat=cfg.model.remat, dtype=cfg.model.dtype, trainable=cfg.train.trainable,
                    bytes_per_device=None, hbm_bytes_per_device=spec.hbm_bytes, fits=False, compiler_fits=False,
                    compile_s=round(compile_s, 2), flops_per_device=None, bytes_accessed_per_device=None,
                    est_step_s=None, est_mfu=None, oom=dict(LAST_OOM),
                    model_flops_per_device=model_flops(cfg, program_name, max_new_tokens) / len(devices))
    mem = memory(compiled)
    out = dict(topology=topology, chip=chip, device_kind=devices[0].device_kind, devices=len(devices),
               chips=len(devices) // cores, mesh=dict(mesh.shape), program=program_name, schedule=cfg.hidrop.name,
               attention_impl=attn,
               batch_per_device=cfg.train.batch_size // dp, max_len=cfg.data.max_len,
               remat=cfg.model.remat, dtype=cfg.model.dtype, trainable=cfg.train.trainable,
               bytes_per_device=mem, hbm_bytes_per_device=spec.hbm_bytes, compiler_fits=fits,
               compile_s=round(compile_s, 2))
    out["fits"] = fits_hbm(out)
    if program_name == "generate":
        out["max_new_tokens"] = max_new_tokens
    out.update(flops_fields(cfg, mesh, program_name, max_new_tokens, flops, spec))
    return out


def with_batch(cfg, per_device: int, mesh_dp: int):
    c = copy.deepcopy(cfg)
    c.train.batch_size = per_device * mesh_dp
    return c


def next_batch(probes: dict, lo: int, hi, hbm: int, limit: int, guess: bool = True) -> int:
    """The next per-device batch to compile, strictly between `lo` (the largest known to fit; 0:
    none) and `hi` (the smallest known not to; None: none yet). Memory per chip is a fixed part
    (weights, optimizer state) plus temporaries that grow with the rows, so the guess is where
    the line through the probes nearest the boundary (or through the origin and the one probe
    known) gives temporaries that fill what the fixed part leaves of `hbm`. Without a guess (or
    with `guess=False`) it doubles, or bisects once bounded. `probes`: {batch: {"temp", "fixed"}}
    (bytes; None where the compiler did not say)."""
    top = limit + 1 if hi is None else hi
    g = None
    pts = sorted((b, p["temp"]) for b, p in probes.items() if p.get("temp"))
    near = [x for x in pts if x[0] in (lo, hi)]
    pts = near if len(near) == 2 else pts[-2:]
    fixed = next((probes[b]["fixed"] for b in sorted(probes, reverse=True)  # the largest batch's
                  if probes[b].get("fixed") is not None), 0)
    if guess and pts:
        (b1, t1), (b2, t2) = ((0, 0), pts[0]) if len(pts) == 1 else pts
        slope = (t2 - t1) / (b2 - b1)
        if slope > 0:
            g = int((hbm - fixed - (t1 - slope * b1)) // slope)
    if g is None:
        g = 2 * lo if hi is None else (lo + hi) // 2
    return min(max(g, lo + 1), top - 1)


def fits_hbm(r: dict) -> bool:
    """A report's `fits` (module docstring): the compiler's verdict and the total within HBM
    (reports from before `compiler_fits` existed kept the verdict in `fits`)."""
    mem = r["bytes_per_device"]
    return (bool(r["compiler_fits"] if "compiler_fits" in r else r["fits"]) and mem is not None
            and mem["total"] <= r["hbm_bytes_per_device"])


def verdict(r: dict) -> str:
    if r["fits"]:
        return "fits"
    return "does not fit" + (" (the compiler accepted it)" if r.get("compiler_fits") else "")


def probe_record(r: dict) -> dict:
    """A compiled report as one probe of `max_batch`: its batch, verdict and memory (temporaries
    from the compiler's message where it did not fit)."""
    mem = r["bytes_per_device"]
    return dict(batch=r["batch_per_device"], fits=fits_hbm(r), compile_s=r["compile_s"],
                temp=mem["temp"] if mem else (r.get("oom") or {}).get("required_bytes"),
                fixed=mem["total"] - mem["temp"] if mem else None, report=r)


def max_batch(cfg, topology: str, program_name: str, *, max_new_tokens: int = 32,
              limit: int = 4096, known=None, on_probe=None, log=print):
    """Largest per-device batch (rows per data×fsdp shard) whose program fits, from the config's
    own batch: each probe is a full compile, so the next batch is guessed from the memory seen
    (`next_batch`; 3 compiles where memory is linear in the rows, against 6 for doubling and
    bisection from 1). Three guesses running that fail to halve the bracket (or, unbounded, to
    double the largest fit) give way to one doubling or bisection, and the answer is exact
    whatever the compiler does: the largest batch that fits, its successor compiled and over
    HBM. `known`: probes from an earlier, interrupted search ({batch: record}), not compiled
    again; `on_probe(record)` is told each new one.
    -> (best or 0, [records without their reports], the best batch's report or None)."""
    chip, devices = topology_devices(topology)
    dp = data_parallel(topology_mesh(cfg, devices))
    hbm = device_spec(chip, devices).hbm_bytes
    probes = {int(b): r for b, r in (known or {}).items()}

    def probe(b):
        if b not in probes:
            r = report(with_batch(cfg, b, dp), topology, program_name, max_new_tokens=max_new_tokens,
                       flops="none", chip_devices=(chip, devices), retry_oom=False)
            probes[b] = probe_record(r)
            if on_probe:
                on_probe(probes[b])
            log(f"  batch/device {b}: {verdict(r)} ({r['compile_s']:.1f} s)")

    def bracket():  # (largest batch that fits below the smallest that does not, that one or None)
        hi = min((b for b, p in probes.items() if not p["fits"]), default=None)
        return max((b for b, p in probes.items() if p["fits"] and (hi is None or b < hi)), default=0), hi

    lo, hi = bracket()
    b = None if probes else max(1, min(cfg.train.batch_size // dp, limit))
    slow = 0
    while not ((hi is not None and hi - lo <= 1) or (hi is None and lo >= limit)):
        width, lo0 = (None if hi is None else hi - lo), lo
        probe(b if b is not None else next_batch(probes, lo, hi, hbm, limit, guess=slow < 3))
        lo, hi = bracket()
        halved = (hi - lo <= width / 2) if width is not None else (hi is not None or lo >= 2 * max(lo0, 1))
        slow, b = (0 if halved else slow + 1), None
    records = [{k: v for k, v in probes[b].items() if k != "report"} for b in sorted(probes)]
    return lo, records, (probes[lo]["report"] if lo else None)


def run(cfg, topology: str, program_name: str, *, find_max: bool = False, max_new_tokens: int = 32,
        flops: str = "host", log=print, retry_oom: bool = True, known_probes=None, on_probe=None) -> dict:
    """`report`, or with `find_max` the report of the largest batch that fits (`max_batch`; its
    `known_probes` and `on_probe` let a caller resume an interrupted search)."""
    if program_name not in PROGRAMS:
        raise ValueError(f"--program {program_name!r} is not supported; allowed: {PROGRAMS}")
    schedule_of(cfg)  # a bad schedule fails before any compile
    _check_flops(flops)  # before any max-batch probe
    chip_devices = topology_devices(topology)
    if find_max:
        best, probes, out = max_batch(cfg, topology, program_name, max_new_tokens=max_new_tokens,
                                      known=known_probes, on_probe=on_probe, log=log)
        mesh = topology_mesh(cfg, chip_devices[1])
        cfg = with_batch(cfg, max(best, 1), data_parallel(mesh))
        if out is None:  # not even one row fits: batch 1's figures, compiled again past HBM
            out = report(cfg, topology, program_name, max_new_tokens=max_new_tokens, flops=flops,
                         chip_devices=chip_devices, retry_oom=retry_oom)
        else:  # the largest probe that fits is the report; only its FLOPs are left to count
            out = dict(out, **flops_fields(cfg, mesh, program_name, max_new_tokens, flops,
                                           device_spec(*chip_devices)))
        out.update(max_batch_per_device=best, max_batch_probes=probes)
        return out
    return report(cfg, topology, program_name, max_new_tokens=max_new_tokens, flops=flops,
                  chip_devices=chip_devices, retry_oom=retry_oom)


def summary(r: dict) -> str:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    m = r["bytes_per_device"]
    if m is None:
        return (f"{r['program']} {r['schedule']} on {r['topology']}, mesh {r['mesh']}, batch/device "
                f"{r['batch_per_device']}: DOES NOT FIT ({r['compile_s']} s): "
                + r["oom"]["message"].splitlines()[0][:300])
    s = (f"{r['program']} {r['schedule']} on {r['topology']} ({r['devices']} × {r['device_kind']}), mesh "
         f"{r['mesh']}, batch/device {r['batch_per_device']}: total {g(m['total'])} of {g(r['hbm_bytes_per_device'])} "
         f"HBM ({verdict(r)}; argument {g(m['argument'])}, output "
         f"{g(m['output'])}, temp {g(m['temp'])}, alias {g(m['alias'])}), compiled in {r['compile_s']} s")
    if r.get("flops_per_device") is not None:
        s += (f"; {r['flops_per_device'] / 1e12:.2f} TFLOP/device, est. step {r['est_step_s'] * 1e3:.1f} ms, "
              f"est. MFU {r['est_mfu']:.2f}")
    if "max_batch_per_device" in r:
        s += f"; largest batch/device that fits: {r['max_batch_per_device']}"
    return s


def main(argv):
    del argv
    r = run(FLAGS.config, FLAGS.topology, FLAGS.program, find_max=FLAGS["max-batch"].value,
            max_new_tokens=FLAGS["max-new-tokens"].value, flops=FLAGS.flops)
    print(summary(r))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "config file[:args]", lock_config=False)
    flags.DEFINE_string("topology", None, "TPU slice, CHIP:AxB[xC], e.g. v5p:4x4x4, v5e:8x8")
    flags.DEFINE_enum("program", "train", PROGRAMS, "which production program to compile")
    flags.DEFINE_bool("max-batch", False, "search the largest per-device batch that fits")
    flags.DEFINE_integer("max-new-tokens", 32, "decode steps the generation caches hold")
    flags.DEFINE_enum("flops", "host", FLOPS, "count the unrolled program's FLOPs for the roofline: "
                      "lowered on this host (seconds), compiled by libtpu (also bytes; slow), or not")
    flags.DEFINE_string("out", "", "write the JSON report here")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
