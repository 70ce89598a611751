"""Launch scripts (launch/): each `--dry-run` prints the commands it would run, they contain the
pieces that make them work (gcloud --worker=all, srun, the train module, the config string
passed through intact), the scripts are shellcheck-clean, and the Vicuna + CLIP assembly helper
writes a LLaVA directory that `import-hf` reads."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]
CONFIG = "configs/llava15_7b.py:schedule=tok64,dtype=bfloat16"
TRAIN = ["--config", CONFIG, "--workdir", "/shared/runs/x", "--config.train.mesh=(1,-1,1)"]


def run(script, *args, ok=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=60)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def lines(out):
    """Each printed line as shell words (they must parse as shell)."""
    return [shlex.split(line) for line in out.strip().splitlines()]


def test_help_and_strict_mode():
    for s in SCRIPTS:
        p = run(s, "--help")
        assert "Usage:" in p.stdout and "--dry-run" in p.stdout, s
        assert "set -euo pipefail" in (LAUNCH / s).read_text(), s
        assert os.access(LAUNCH / s, os.X_OK), f"{s} is not executable"


def test_local_dry_run_single_and_multi_process():
    (cmd,) = lines(run("local.sh", "--dry-run", *TRAIN).stdout)
    assert cmd[1:] == ["-m", "hidrop_jax.train", *TRAIN] and cmd[0].endswith("python")

    out = run("local.sh", "--dry-run", "--procs", "2", "--cpu-devices", "2", "--port", "23456",
              "--", *TRAIN).stdout
    procs = lines(out)
    assert procs[-1] == ["wait"] and len(procs) == 3
    for i, words in enumerate(procs[:2]):
        assert words[0] == "env" and "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in words
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in words
        j = words.index("hidrop_jax.train")
        assert words[j + 1:j + 1 + len(TRAIN)] == TRAIN
        assert words[j + 1 + len(TRAIN):j + 4 + len(TRAIN)] == [
            "--coordinator=127.0.0.1:23456", "--num_processes=2", f"--process_id={i}"]
        assert words[-1] == "&"
    assert "process_1.log" in out

    bad = run("local.sh", "--procs", "0", *TRAIN, ok=False)
    assert bad.returncode == 2 and "--procs" in bad.stderr


def test_tpu_pod_dry_run():
    out = run("tpu_pod.sh", "--dry-run", "--name", "pod1", "--zone", "us-east5-a", "--project", "p",
              "--create", "--accelerator-type", "v5p-64", "--env", "LIBTPU_INIT_ARGS=--x=1",
              "--", *TRAIN).stdout
    cmds = lines(out)
    assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1"]
    assert "--accelerator-type=v5p-64" in cmds[0] and "--version=v2-alpha-tpuv5" in cmds[0]
    assert any(c[:2] == ["git", "-C"] and "archive" in c for c in cmds)
    scp = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"])
    assert "--worker=all" in scp
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 3
    for c in ssh:
        assert c[5] == "pod1" and "--worker=all" in c and "--zone=us-east5-a" in c
    remote = [c[c.index("--command") + 1] for c in ssh]
    setup, train = remote[1], remote[2]
    assert "-m venv .venv" in setup and "requirements" in setup and "'jax[tpu]==" in setup
    jax_pin = next(r for r in (REPO / "requirements.txt").read_text().split() if r.startswith("jax=="))
    assert f"'jax[tpu]{jax_pin[3:]}'" in setup  # the same version as the pin
    words = shlex.split(train)
    j = words.index("hidrop_jax.train")
    # --distributed: plain TPU VMs set no variable jax.distributed could detect the pod by
    assert words[j + 1:] == ["--distributed", *TRAIN] and "LIBTPU_INIT_ARGS=--x=1" in words

    only = lines(run("tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--skip-setup",
                     "--detach", *TRAIN).stdout)
    assert len(only) == 1 and "nohup" in only[0][-1] and CONFIG in only[0][-1]

    bad = run("tpu_pod.sh", "--dry-run", "--zone", "z", *TRAIN, ok=False)
    assert bad.returncode == 2 and "--name" in bad.stderr


def test_slurm_dry_run():
    (cmd,) = lines(run("slurm_gpu.sbatch", "--dry-run", "--", *TRAIN).stdout)
    assert cmd[0] == "srun" and "--ntasks-per-node=8" in cmd and "--gpus-per-node=8" in cmd
    assert "--kill-on-bad-exit=1" in cmd
    j = cmd.index("hidrop_jax.train")
    assert cmd[j - 1] == "-m" and cmd[j - 2].endswith(".venv/bin/python") and cmd[j + 1:] == TRAIN
    header = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-node=8" in header


def test_shellcheck():
    paths = [str(LAUNCH / s) for s in SCRIPTS] + [str(REPO / "experiments" / "queue.sh")]
    if shutil.which("shellcheck") is None:
        # Fallback only: CI installs shellcheck (Debian package `shellcheck`).
        for p in paths:
            subprocess.run(["bash", "-n", p], check=True)
        pytest.skip("shellcheck is not installed: checked `bash -n` syntax only")
    # -x follows `source launch/common.sh` (the directives name it from the repository root)
    p = subprocess.run(["shellcheck", "-x", "--shell=bash", *paths, str(LAUNCH / "common.sh")],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def _tiny_vicuna_and_clip(root: Path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, rms_norm_eps=1e-5,
                                       max_position_embeddings=256))
    llm.save_pretrained(root / "vicuna")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(47)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(root / "vicuna")
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=28, patch_size=14))
    clip.save_pretrained(root / "clip")
    return llm, clip


def test_assemble_llava_then_import(tmp_path):
    sys.path.insert(0, str(LAUNCH))
    try:
        import assemble_llava
    finally:
        sys.path.remove(str(LAUNCH))
    from hidrop_jax.convert import load_hf
    from hidrop_jax.data.tokenizer import load_tokenizer

    llm, clip = _tiny_vicuna_and_clip(tmp_path)
    out = tmp_path / "llava"
    assemble_llava.main(["--llm", str(tmp_path / "vicuna"), "--vision", str(tmp_path / "clip"),
                         "--out", str(out)])
    tok = load_tokenizer(str(out))
    assert tok.convert_tokens_to_ids("<image>") == 50
    cfg, params = load_hf(out)
    m = cfg.model
    assert m.image_token_id == 50 and m.text.vocab_size == 64 and m.feature_layer == -2
    assert m.vision.image_size == 28 and m.text.num_layers == 2 and m.vision.num_layers == 3
    emb = params["text"]["embed_tokens"]["embedding"]
    src = llm.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(emb[:50], src)
    np.testing.assert_allclose(emb[50:], np.broadcast_to(src.mean(0), (14, 32)), rtol=1e-5, atol=1e-6)
    head = params["text"]["lm_head"]["kernel"]  # [in, out]
    np.testing.assert_array_equal(head[:, :50], llm.lm_head.weight.detach().numpy().T)
    q_src = next(v for k, v in clip.state_dict().items() if k.endswith("layers.1.self_attn.q_proj.weight"))
    np.testing.assert_array_equal(params["vision"]["layers"]["q_proj"]["kernel"][1], q_src.numpy().T)
    w1 = params["projector"]["linear_1"]["kernel"]
    assert w1.shape == (16, 32) and 0 < np.abs(w1).max() <= 1 / np.sqrt(16)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())  # the legacy hub layout, as export-hf writes
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
            "multi_modal_projector.linear_2.bias"} <= names
    with pytest.raises(FileExistsError):
        assemble_llava.main(["--llm", str(tmp_path / "vicuna"), "--vision", str(tmp_path / "clip"),
                             "--out", str(out)])
