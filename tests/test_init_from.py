"""`train.init_from` and `configs/from_checkpoint.py` accept all three kinds of model directory
(an `import-hf` checkpoint, a training workdir, a HF LLaVA directory) and start exactly from
their weights; another architecture is refused field by field."""

from pathlib import Path

import jax
import numpy as np
import pytest

from hf_tiny import make_hf_llava
from hidrop_jax import sharding as shard_lib
from hidrop_jax import train as train_lib
from hidrop_jax.checkpoint import kind_of, open_run, save_checkpoint
from hidrop_jax.config import load_config, schedule_of
from hidrop_jax.convert import load_hf, main as convert_main
from hidrop_jax.hidrop.schedule import preset

ROOT = Path(__file__).resolve().parents[1]
FROM = ROOT / "configs" / "from_checkpoint.py"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    make_hf_llava(d / "hf")
    convert_main(["import-hf", str(d / "hf"), str(d / "ckpt")])
    return d


def _init(cfg):
    mesh = shard_lib.make_mesh((1, 1, 1))
    tx, _ = train_lib.make_optimizer(cfg.train, train_lib.abstract_params(cfg))
    return train_lib.init_state(cfg, mesh, tx)


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_kinds_are_recognised(dirs):
    assert kind_of(dirs / "hf") == "hf" and kind_of(dirs / "ckpt") == "checkpoint"
    with pytest.raises(FileNotFoundError, match="is not a hidrop_jax checkpoint, training workdir"):
        kind_of(dirs)


@pytest.mark.parametrize("kind", ["hf", "ckpt"])
def test_from_checkpoint_config_starts_from_the_weights(dirs, kind):
    cfg = load_config(f"{FROM}:path={dirs / kind},schedule=tok64")
    assert cfg.train.init_from == str(dirs / kind)
    assert cfg.model.text.num_layers == 4 and cfg.model.vision.image_size == 56  # from the directory
    assert schedule_of(cfg) == preset("tok64", 4, 16)  # the preset scaled to this model
    state = train_lib.load_pretrained(cfg, _init(cfg), cfg.train.init_from)
    _equal(state["params"], load_hf(dirs / "hf")[1])


def test_workdir_starts_from_its_latest_step(dirs, tmp_path):
    """A workdir-shaped run (stage 1) as init_from: the latest step's weights, exactly."""
    cfg = load_config(f"{FROM}:path={dirs / 'ckpt'}")
    state = _init(cfg)
    mgr = train_lib.checkpoint_manager(tmp_path / "s1", 3, False)
    _, ref = load_hf(dirs / "hf")
    for step, scale in ((1, 1.0), (2, 2.0)):  # two steps with different weights
        params = jax.tree.map(lambda a: np.asarray(a) * scale, ref)
        st = dict(state, params=jax.tree.map(jax.device_put, params))
        train_lib.save_state(mgr, step, st, _Iter())
    mgr.wait_until_finished()
    (tmp_path / "s1" / "config.json").write_text(cfg.to_json())
    run = open_run(tmp_path / "s1")
    assert run.kind == "workdir" and run.step == 2
    cfg2 = load_config(f"{FROM}:path={tmp_path / 's1'}")
    got = train_lib.load_pretrained(cfg2, _init(cfg2), cfg2.train.init_from)["params"]
    _equal(got, jax.tree.map(lambda a: np.asarray(a) * 2.0, ref))
    with pytest.raises(ValueError, match=r"step=5: .* holds steps \[1, 2\]"):
        open_run(tmp_path / "s1", step=5)


def test_other_architecture_is_refused_naming_the_field(dirs):
    cfg = load_config(f"{FROM}:path={dirs / 'ckpt'}")
    cfg.model.text.intermediate_size = 64
    with pytest.raises(ValueError, match=r"model.text.intermediate_size: 96 != 64"):
        train_lib.load_pretrained(cfg, _init(cfg), str(dirs / "ckpt"))


def test_from_checkpoint_needs_a_path():
    with pytest.raises(ValueError, match="needs path=DIR"):
        load_config(f"{FROM}:schedule=tok64")


def test_import_hf_keeps_the_tokenizer(tmp_path):
    """A HF directory with tokenizer files: `import-hf` keeps them beside the weights, where
    training, generation and export look."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    make_hf_llava(tmp_path / "hf")
    vocab = {f"w{i}": i for i in range(90)} | {"<image>": 95}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                  unk_token="w0")
    tok.save_pretrained(tmp_path / "hf")
    convert_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    save_checkpoint(tmp_path / "ckpt2", *load_hf(tmp_path / "hf"))
    with pytest.raises(FileExistsError, match="not empty"):
        convert_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")])


class _Iter:
    """Stands in for grain's iterator in a saved train state (its position is not read here)."""

    def get_state(self):
        return b"{}"

    def set_state(self, state):
        pass
