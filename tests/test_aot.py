"""Ahead-of-time compilation for TPU slices on this CPU host (`hidrop_jax.aot`, libtpu).

What could fail: the CLI drops a field; the byte total is not argument + output + temp − alias;
`fits` disagrees with the chip's HBM; the FLOPs counted on this host are not libtpu's; the compiled argument bytes are not the sharded optimizer
state we think we hold (checked against an analytic count: Adam's two moments per sharded
parameter); XLA's FLOPs order two schedules differently from the analytic formula; a bigger
batch does not need more temporaries; `--max-batch` returns a batch that does not fit or one
whose successor also fits; the 7B stage-2 program "fits" 4 v5e chips (16 GiB each: it cannot);
bad topologies and meshes fail without a one-line reason; a one-layer segment under full remat
keeps its activations for the backward (XLA unrolls its scan and merges the recompute away).
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e .[tpu]): no TPU compiler")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "aot_config.py")
FIELDS = ("topology", "chip", "devices", "mesh", "program", "schedule", "batch_per_device",
          "bytes_per_device", "hbm_bytes_per_device", "fits", "flops_per_device",
          "bytes_accessed_per_device", "compile_s", "est_step_s", "est_mfu")
ENV = dict(os.environ, TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _config(arg="schedule=tok64"):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import aot_config
    return aot_config.get_config(arg)


def _aot():
    from hidrop_jax import aot
    return aot


@functools.lru_cache(maxsize=None)
def _train_memory(trainable: str, batch: int) -> dict:
    """The compiled Tok64 train step's memory per chip on v5p:2x2x1 (compiled once per module:
    two tests share the (all, 4) program)."""
    aot = _aot()
    cfg = _config()
    cfg.train.update(trainable=trainable, batch_size=batch)
    mesh = aot.topology_mesh(cfg, aot.topology_devices("v5p:2x2x1")[1])
    compiled, fits, _ = aot.compile_program(*aot.program(cfg, mesh, "train", 32))
    assert fits
    return aot.memory(compiled)


def test_cli_writes_every_field(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "hidrop_jax.aot", "--config", f"{CONFIG}:schedule=tok64",
                        "--topology", "v5p:2x2x1", "--program", "train", "--config.train.batch_size=8",
                        "--out", str(out)], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
    assert (r["topology"], r["chip"], r["devices"], r["program"], r["schedule"]) == \
        ("v5p:2x2x1", "v5p", 4, "train", "tok64")
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["batch_per_device"] == 2
    m = r["bytes_per_device"]
    assert m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
    # the train state is donated: its output aliases its argument
    assert 0 < m["alias"] <= min(m["argument"], m["output"])
    assert r["hbm_bytes_per_device"] == 95 * 2 ** 30
    assert r["fits"] and m["total"] <= r["hbm_bytes_per_device"]
    # FLOPs counted on this host by default (bytes before fusion are not reported): the
    # roofline is their compute term
    assert r["flops_source"] == "host" and r["bytes_accessed_per_device"] is None
    peak, bw = 459e12, 2765e9  # v5p, public spec
    assert r["est_step_s"] == pytest.approx(r["flops_per_device"] / peak)
    assert 0 < r["est_mfu"] <= 1
    # ... and they are libtpu's own count of the same unrolled step compiled for the slice
    aot = _aot()
    chip, devices = aot.topology_devices("v5p:2x2x1")
    cfg = _config()
    cfg.train.batch_size = 8
    t = aot.flops_fields(cfg, aot.topology_mesh(cfg, devices), "train", 32, "tpu", aot.device_spec(chip, devices))
    assert r["flops_per_device"] == pytest.approx(t["flops_per_device"], rel=0.02)
    assert t["est_step_s"] == pytest.approx(max(t["flops_per_device"] / peak, t["bytes_accessed_per_device"] / bw))


@pytest.mark.slow
def test_argument_bytes_are_the_sharded_optimizer_state():
    """argument(train everything) − argument(train the projector only) = Adam's mu and nu of the
    vision tower and the LLM, sharded 4 ways (the batch and the rest cancel)."""
    import jax
    from hidrop_jax import sharding as shard_lib
    from hidrop_jax.model import abstract_params
    aot = _aot()
    args = {trainable: _train_memory(trainable, 4)["argument"] for trainable in ("all", "projector")}
    cfg = _config()
    mesh = aot.topology_mesh(cfg, aot.topology_devices("v5p:2x2x1")[1])
    shardings = shard_lib.param_shardings(cfg, mesh)
    params = abstract_params(cfg)
    shard_bytes = 0
    for part in ("vision", "text"):
        for a, s in zip(jax.tree.leaves(params[part]), jax.tree.leaves(shardings[part])):
            shard = [dim // (int(np.prod([mesh.shape[n] for n in ((ax,) if isinstance(ax, str) else ax)]))
                             if ax else 1) for dim, ax in zip(a.shape, tuple(s.spec) + (None,) * a.ndim)]
            shard_bytes += int(np.prod(shard)) * a.dtype.itemsize
    moments = 2 * shard_bytes
    assert args["all"] - args["projector"] == pytest.approx(moments, rel=0.02)


@pytest.mark.slow
def test_bigger_batch_needs_more_temporaries():
    temp = [_train_memory("all", batch)["temp"] for batch in (4, 16)]
    assert temp[1] > 2 * temp[0], temp


@pytest.mark.slow
def test_flops_follow_the_schedules_analytic_order():
    """XLA's FLOPs of the unrolled prefill: Tok64 does less than vanilla, and the saving is the
    analytic one (`schedule.layer_flops` over the per-layer token counts) within 10%."""
    from hidrop_jax.config import schedule_of
    from hidrop_jax.hidrop import schedule as schedule_lib
    aot = _aot()
    chip, devices = aot.topology_devices("v5p:2x2x1")
    flops, analytic = {}, {}
    for name in ("vanilla", "tok64"):
        cfg = _config(f"schedule={name}")
        cfg.data.max_len = 16  # vision tokens dominate, so the schedules differ clearly
        cfg.model.attention_impl = "xla"  # the kernel's own estimate counts its padded blocks
        compiled, _, _ = aot.compile_program(*aot.program(aot.unrolled(cfg), aot.topology_mesh(cfg, devices),
                                                          "prefill", 4))
        flops[name] = float(aot.cost(compiled)["flops"])
        # the host's count (`--flops=host`, the default) is libtpu's
        assert aot.host_flops(cfg, "prefill", 4) / len(devices) == pytest.approx(flops[name], rel=0.02)
        t = cfg.model.text
        s = schedule_of(cfg)
        analytic[name] = sum(schedule_lib.layer_flops(16 + n, t.hidden_size, t.intermediate_size)
                             for n in s.tokens_per_layer())
    assert flops["tok64"] < flops["vanilla"]
    saved_xla = 1 - flops["tok64"] / flops["vanilla"]
    saved_formula = 1 - analytic["tok64"] / analytic["vanilla"]
    assert saved_xla > 0.5 * saved_formula, (saved_xla, saved_formula)  # tower/head dilute it


def test_fill_flops_gives_7b_rows_a_roofline_and_keeps_their_memory(tmp_path):
    """`benchmarks/tpu_aot.py --fill-flops` (BENCHMARKS.md): a 7B row compiled without FLOPs gets
    the host count, between the analytic model FLOPs and 1.4× them (full remat recomputes the
    forward: at most 4 forwards for 3); its compiled figures and the other rows stay as they were."""
    sys.path.insert(0, ROOT)
    from benchmarks import tpu_aot
    memory = dict(argument=1, output=2, temp=3, alias=1, total=5, code=0)
    row = dict(model="7b", stage="s2", topology="v5p:2x2x1", schedule="vanilla", remat="full",
               mesh_arg=[1, -1, 1], attention_impl="pallas", batch_per_device=1, bytes_per_device=memory,
               flops_per_device=None, est_step_s=None)
    done = dict(row, schedule="tok64", flops_per_device=1.0, est_step_s=2.0)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row, done)))
    tpu_aot.fill_flops(str(path))
    filled, kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == done and filled["bytes_per_device"] == memory and filled["flops_source"] == "host"
    assert filled["model_flops_per_device"] < filled["flops_per_device"] < 1.4 * filled["model_flops_per_device"]
    assert filled["est_step_s"] == pytest.approx(filled["flops_per_device"] / 459e12)  # v5p peak bf16


@pytest.mark.expensive  # minutes of compiles: `pytest -m expensive`, not in CI
def test_max_batch_fits_and_the_next_does_not():
    """On v5e (16 GiB) with 4,096 text rows the attention logits bound the batch to a few rows."""
    aot = _aot()
    cfg = _config("schedule=vanilla")
    cfg.data.max_len = 4096
    cfg.train.mesh = (-1, 1, 1)
    best, probes, _ = aot.max_batch(cfg, "v5e:2x2", "prefill", max_new_tokens=4, log=lambda *_: None)
    seen = {p["batch"]: p["fits"] for p in probes}
    assert best >= 1 and seen[best] and not seen[best + 1], probes


def test_a_program_the_compiler_accepts_past_the_chips_hbm_does_not_fit(monkeypatch):
    """libtpu accepted 7B stage 2 at 9 rows per v5e chip with a total of 16.14 GiB of 16: `fits`
    needs the compiler's verdict and the total within HBM; the verdict is kept beside it."""
    aot = _aot()
    hbm = aot.device_spec(*aot.topology_devices("v5e:2x2")).hbm_bytes
    for total, fits in ((hbm + 2 ** 20, False), (hbm, True)):
        mem = dict(argument=2 ** 30, output=0, temp=total - 2 ** 30, alias=0, total=total, code=0)
        monkeypatch.setattr(aot, "compile_program", lambda fn, args, **_: (object(), True, 1.0))
        monkeypatch.setattr(aot, "memory", lambda compiled, mem=mem: mem)
        r = aot.report(_config(), "v5e:2x2", "train", flops="none")
        assert r["compiler_fits"] and r["fits"] is fits and aot.probe_record(r)["fits"] is fits
        assert ("accepted" in aot.summary(r)) is not fits


GB = 10 ** 9
MEMORY = {  # temporaries per chip (bytes) against rows per chip, as a compiler might grow them
    "linear": lambda b: 3.6 * GB * b,
    "affine": lambda b: 2 * GB + 0.9 * GB * b,
    "convex": lambda b: 0.05 * GB * b * b + 0.1 * GB * b,
    "concave": lambda b: 4 * GB * b ** 0.5,
    "step": lambda b: 0.2 * GB * b + (9 * GB if b > 11 else 0),  # a strategy change at 12 rows
    "tiny": lambda b: 0.001 * GB * b,  # never reaches HBM below the limit
    "huge": lambda b: 40 * GB * b,  # not even one row fits
}


def _fake_compiles(monkeypatch, temp, fixed=1.3 * GB, topology="v5e:2x2", killed_at=None):
    """`aot.report` answered from a memory curve instead of libtpu: what each search compiles
    (the process is killed at compile number `killed_at`)."""
    aot = _aot()
    compiled = []
    hbm = aot.device_spec(*aot.topology_devices(topology)).hbm_bytes

    def report(cfg, topology, program_name, *, chip_devices, retry_oom, **_):
        b = cfg.train.batch_size // aot.data_parallel(aot.topology_mesh(cfg, chip_devices[1]))
        if len(compiled) + 1 == killed_at:
            raise KeyboardInterrupt
        compiled.append(b)
        t = int(temp(b))
        ok = fixed + t <= hbm
        mem = dict(argument=int(fixed), output=0, temp=t, alias=0, total=int(fixed) + t) if ok else None
        return dict(topology=topology, devices=len(chip_devices[1]), device_kind="fake", mesh={},
                    program=program_name, schedule=cfg.hidrop.name, remat=cfg.model.remat,
                    attention_impl="pallas", batch_per_device=b, fits=ok,
                    compile_s=1.0, bytes_per_device=mem, hbm_bytes_per_device=hbm,
                    oom=None if ok else dict(required_bytes=t, message="over HBM"))
    monkeypatch.setattr(aot, "report", report)
    return compiled, lambda temp_: max((b for b in range(1, 4097) if fixed + temp_(b) <= hbm), default=0)


@pytest.mark.parametrize("curve", sorted(MEMORY))
@pytest.mark.parametrize("start", [1, 2, 7, 64])
def test_max_batch_search_ends_where_a_row_by_row_count_does(monkeypatch, curve, start):
    """Whatever the memory curve and the config's batch, the search returns the largest batch
    that fits (counted row by row over the curve), compiles no batch twice, and never needs
    more compiles than doubling + bisection would three times over."""
    aot = _aot()
    compiled, brute = _fake_compiles(monkeypatch, MEMORY[curve])
    cfg = _config()
    cfg.train.batch_size = 4 * start
    best, probes, rep = aot.max_batch(cfg, "v5e:2x2", "train", log=lambda *_: None)
    assert best == brute(MEMORY[curve])
    assert len(compiled) == len(set(compiled)) == len(probes) <= 3 * (2 * 12 + 1)
    if best:
        assert rep["batch_per_device"] == best and rep["fits"]
        assert best == 4096 or {p["batch"]: p["fits"] for p in probes}.get(best + 1) is False
    else:
        assert rep is None and 1 in compiled


def test_max_batch_reads_the_memory_it_sees(monkeypatch):
    """Memory linear in the rows (fixed state + activations per row, the common case): from the
    config's 2 rows the search compiles three batches (the start, the guess, its successor)
    where doubling and bisection would compile six."""
    aot = _aot()
    compiled, brute = _fake_compiles(monkeypatch, MEMORY["linear"])
    cfg = _config()
    cfg.train.batch_size = 8
    best, _, _ = aot.max_batch(cfg, "v5e:2x2", "train", log=lambda *_: None)
    assert best == brute(MEMORY["linear"]) == 4 and compiled == [2, 4, 5]


def test_an_interrupted_max_batch_search_resumes_without_compiling_a_batch_again(monkeypatch):
    """`tpu_aot.py --max-batch` writes each probe as it is compiled; a search killed half-way
    and run again compiles only what it had not, and the largest probe that fits becomes the
    report (with its FLOPs counted), no compile of its own."""
    aot = _aot()
    compiled, brute = _fake_compiles(monkeypatch, MEMORY["convex"])
    cfg = _config()
    cfg.train.batch_size = 4
    seen = []

    def stop_after_two(record):
        seen.append(json.loads(json.dumps(record)))  # what a JSON-lines file would give back
        if len(seen) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        aot.max_batch(cfg, "v5e:2x2", "train", on_probe=stop_after_two, log=lambda *_: None)
    first = list(compiled)
    r = aot.run(cfg, "v5e:2x2", "train", find_max=True, flops="none", log=lambda *_: None,
                known_probes={p["batch"]: p for p in seen})
    again = compiled[len(first):]
    assert r["max_batch_per_device"] == r["batch_per_device"] == brute(MEMORY["convex"])
    assert not set(first) & set(again) and len(again) == len(set(again))
    assert r["model_flops_per_device"] > 0 and [p["batch"] for p in r["max_batch_probes"]] == sorted(first + again)


def test_tpu_aot_max_batch_killed_half_way_resumes_from_its_probes_file(monkeypatch, tmp_path):
    """`benchmarks/tpu_aot.py --rows 7b:s2:v5e:8x8 --max-batch` after the plain row (2 rows per
    chip), killed at its third compile and started again: the row it writes has the largest
    batch that fits, and no batch is compiled twice (the plain row's batch included)."""
    sys.path.insert(0, ROOT)
    from benchmarks import tpu_aot
    out = str(tmp_path / "rows.jsonl")
    run = functools.partial(tpu_aot.measure, ["7b:s2:v5e:8x8"], ["vanilla"], out, "full", (1, -1, 1),
                            flops="none")
    plain, _ = _fake_compiles(monkeypatch, MEMORY["concave"], topology="v5e:8x8")
    run(find_max=False)
    compiled, _ = _fake_compiles(monkeypatch, MEMORY["concave"], topology="v5e:8x8", killed_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(find_max=True)
    assert len(tpu_aot.done_rows(out)) == 1 and len(compiled) == 2
    again, brute = _fake_compiles(monkeypatch, MEMORY["concave"], topology="v5e:8x8")
    run(find_max=True)
    row = tpu_aot.done_rows(out)[-1]
    assert row["max_batch_per_device"] == row["batch_per_device"] == brute(MEMORY["concave"])
    assert plain == [2] and len(set(plain + compiled + again)) == len(plain + compiled + again)
    run(find_max=True)  # a finished row is not searched again
    assert len(tpu_aot.done_rows(out)) == 2


def test_one_layer_segments_under_full_remat_hold_less_than_without_remat():
    """HiDrop runs a one-layer segment at the injection and after every cut. XLA unrolls a
    one-trip scan, and a remat that relied on the loop to keep its recompute apart was merged
    with the forward: every intermediate stayed alive until the backward, as without remat
    (2.3× vanilla's bytes per row for 7B-like Tok64 on TPU). Four one-layer segments in a row,
    compiled for a TPU chip: with `remat=full` the backward must hold well under what it holds
    without remat (measured: 27 MiB against 75)."""
    import jax
    import jax.numpy as jnp
    from hidrop_jax.layers.common import slice_layers, stacked
    from hidrop_jax.layers.llama import DecoderLayer, TextDims
    from hidrop_jax.layers.rope import rope_tables
    aot = _aot()
    td = TextDims(vocab_size=64, hidden_size=256, intermediate_size=2048, num_heads=2, num_kv_heads=2,
                  head_dim=128, rms_norm_eps=1e-5, rope_theta=1e4, dtype=jnp.bfloat16, attention_impl="xla")
    B, S, N = 2, 512, 4
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    x = jax.ShapeDtypeStruct((B, S, 256), jnp.float32)
    params = jax.eval_shape(lambda: stacked(DecoderLayer, N)(td).init(
        jax.random.key(0), jnp.zeros(x.shape), rope_tables(pos, 128, 1e4), pos, pos >= 0)["params"])
    chip = jax.sharding.SingleDeviceSharding(aot.topology_devices("v5p:2x2x1")[1][0])
    on_chip = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=chip), t)  # noqa: E731

    def temp(remat):
        one = stacked(DecoderLayer, 1, remat=remat)(td)

        def loss(p, h):
            q = jnp.broadcast_to(jnp.arange(S), (B, S))
            for i in range(N):
                h = one.apply({"params": slice_layers(p, i, i + 1)}, h,
                              rope_tables(q, 128, 1e4), q, q >= 0)[0]
            return (h.astype(jnp.float32) ** 2).sum()
        compiled = jax.jit(jax.grad(loss)).lower(on_chip(params), on_chip(x)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, none = temp("full"), temp("none")
    assert full < 0.6 * none, (full, none)


@pytest.mark.expensive  # minutes of compiles: `pytest -m expensive`, not in CI
def test_7b_stage2_does_not_fit_four_v5e_chips():
    aot = _aot()
    sys.path.insert(0, ROOT)
    from configs import llava15_7b
    cfg = llava15_7b.get_config("schedule=tok64,dtype=bfloat16,remat=full")
    cfg.train.update(batch_size=4, mesh=(1, -1, 1))
    cfg.data.max_len = 1472
    r = aot.report(cfg, "v5e:2x2", "train", flops="none")
    # 7B float32 weights + Adam moments alone are 7e9 × 12 B / 4 chips ≈ 20 GB > 16 GiB
    assert not r["fits"]
    assert r["bytes_per_device"]["total"] > r["hbm_bytes_per_device"]


def test_bad_topology_and_mesh_name_the_value():
    aot = _aot()
    with pytest.raises(ValueError, match=r"--topology 'v9x:2x2'.*allowed.*v5p"):
        aot.topology_devices("v9x:2x2")
    with pytest.raises(ValueError, match=r"--topology 'v5p:3'.*allowed"):
        aot.topology_devices("v5p:3")
    cfg = _config()
    cfg.train.mesh = (2, 3, 1)
    with pytest.raises(ValueError, match=r"train.mesh = \(2, 3, 1\).*4 devices.*allowed.*product is 4"):
        aot.topology_mesh(cfg, aot.topology_devices("v5p:2x2x1")[1])


def test_slice_compiles_keep_out_of_the_persistent_cache():
    """An executable for an absent slice cannot be loaded back from JAX's persistent cache (the
    suite sets one, as `train.compile_cache` does): `compile_program` looks nothing up there,
    even after the process has used the cache, and leaves it in use for what compiles next."""
    import jax
    events = []
    jax.monitoring.register_event_listener(
        lambda event, **_: events.append(event) if event.startswith("/jax/compilation_cache/cache_") else None)
    assert jax.config.jax_enable_compilation_cache and os.environ.get("JAX_COMPILATION_CACHE_DIR")
    jax.jit(lambda a: a - 2.0)(np.ones(3, np.float32))  # the process has compiled through the cache
    assert events, "the suite's persistent cache is not in use: this test shows nothing"
    aot = _aot()
    mesh = aot.topology_mesh(_config(), aot.topology_devices("v5p:2x2x1")[1])
    x = jax.ShapeDtypeStruct((8, 128), np.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("fsdp")))
    fn = jax.jit(lambda a: a * 3.0 + 1.0)
    events.clear()
    compiled, fits, _ = aot.compile_program(fn, (x,))
    assert fits and events == [] and jax.config.jax_enable_compilation_cache
    jax.jit(lambda a: a * 5.0)(np.ones(3, np.float32))  # ... and is back in use afterwards
    assert events


def test_table_puts_schedules_side_by_side_against_vanilla_of_the_same_slice_and_kernel(tmp_path):
    """`benchmarks/tpu_aot.py --table` (BENCHMARKS.md): rows grouped by model (7B before 13B),
    schedules in their fixed order, each step ratio per row against vanilla on the same slice,
    kernel and rows; a row without such a vanilla gets no ratio. A largest-batch row is compared
    with vanilla's largest batch: Tok64 at 11 rows in 5.5 s against vanilla at 9 in 9 s is 0.5
    per row (the step ratio alone, 0.611, would compare different batches)."""
    sys.path.insert(0, ROOT)
    from benchmarks import tpu_aot
    gib = 2 ** 30
    def row(model, schedule, step, attention="pallas", largest=None):
        m = dict(argument=gib, output=gib, temp=3 * gib, alias=gib, total=4 * gib, code=0)
        return dict(model=model, stage="s2", topology="v5e:8x8", schedule=schedule, remat="full",
                    mesh_arg=[1, -1, 1], mesh=dict(data=1, fsdp=64, tensor=1), attention_impl=attention,
                    batch_per_device=largest or 2, bytes_per_device=m, hbm_bytes_per_device=16 * gib,
                    fits=True, est_step_s=step, est_mfu=0.8, model_flops_per_device=step * 10, compile_s=100.4,
                    **(dict(max_batch=True, max_batch_per_device=largest) if largest else {}))
    rows = [row("13b", "vanilla", 2.0), row("7b", "tok64", 0.75), row("7b", "vanilla", 1.0),
            row("7b", "tok48", 0.5, attention="xla"), row("7b", "tok64", 5.5, largest=11),
            row("7b", "vanilla", 9.0, largest=9)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = [line.split("|")[1:-1] for line in tpu_aot.table(str(path)).splitlines()[2:]]
    got = [(c[0].strip(), c[5].strip(), c[6].strip(), c[8].strip(), c[14].strip(), c[15].strip(), c[17].strip())
           for c in body]
    assert got == [("7b", "pallas", "vanilla", "3.0", "1.000", "1.000", "100"),
                   ("7b", "pallas", "tok64", "3.0", "0.750", "0.750", "100"),
                   ("7b", "pallas", "vanilla", "3.0", "1.000", "1.000", "100"),
                   ("7b", "pallas", "tok64", "3.0", "0.500", "0.500", "100"),
                   ("7b", "xla", "tok48", "3.0", "—", "—", "100"),
                   ("13b", "pallas", "vanilla", "3.0", "1.000", "1.000", "100")]
