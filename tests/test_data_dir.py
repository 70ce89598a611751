"""The shared default data directory (issue 15): with `data.data_dir` empty, the bundled
dataset is built once per machine, not once per workdir; concurrent builders take turns and the
later ones reuse the first copy; TFDS's "Downloading and preparing" banner is gone for data
made locally. The default location is a tmp dir here (HIDROP_DATA_DIR), never ~/.cache."""

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorflow_datasets")

import tiny_config  # noqa: E402

from hidrop_jax.data.setup import open_data  # noqa: E402
from hidrop_jax.data import sources  # noqa: E402
from hidrop_jax.data.shapes_vqa import ShapesVqa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = "shapes_vqa:train=6,validation=3,test=3"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "machine_cache"
    monkeypatch.setenv("HIDROP_DATA_DIR", str(d))
    return d


@pytest.fixture
def builds(monkeypatch):
    """Counts dataset builds (TFDS asks a builder for its split generators once per build)."""
    n = []
    orig = ShapesVqa._split_generators
    monkeypatch.setattr(ShapesVqa, "_split_generators",
                        lambda self, dl: n.append(self.builder_config.name) or orig(self, dl))
    return n


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("HIDROP_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.default_data_dir() == str(tmp_path / "xdg" / "hidrop_jax" / "tfds")
    monkeypatch.setenv("HIDROP_DATA_DIR", "/somewhere")
    assert sources.default_data_dir() == "/somewhere"


def test_two_workdirs_build_once(cache, builds, tmp_path):
    cfg = tiny_config.get_config()
    cfg.data.name = TINY
    assert cfg.data.data_dir == ""
    lens = []
    for wd in ("run_a", "run_b"):
        _, _, train, evals = open_data(cfg, tmp_path / wd)
        lens.append((len(train), len(evals)))
        assert not (tmp_path / wd / "data").exists()
    assert builds == ["s0_6_3_3"] and lens == [(6, 3), (6, 3)]
    assert (cache / "shapes_vqa" / "s0_6_3_3").is_dir()


def test_where_each_dataset_goes(cache, tmp_path):
    run = tmp_path / "run" / "data"
    assert sources.data_dir_for(TINY, "", run) == str(cache)
    assert sources.data_dir_for(TINY, "/explicit", run) == "/explicit"  # data.data_dir wins
    # built from the user's files: stays with the run (its name does not identify the contents)
    assert sources.data_dir_for("llava_json:json_file=a.json", "", run) == str(run)
    (run / "shapes_vqa").mkdir(parents=True)  # an earlier run built it in its workdir: kept
    assert sources.data_dir_for(TINY, "", run) == str(run)


_WAITER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from hidrop_jax.data.sources import load_source
src = load_source({spec!r}, "train", {d!r})
print("LEN", len(src), flush=True)
"""


def test_concurrent_builder_waits_then_reuses(tmp_path):
    """While this process holds the build lock, a second one must wait (and say so), then
    reuse this process's copy instead of generating its own."""
    d = str(tmp_path / "shared")
    builder = sources.make_builder(TINY, d)
    lines = []
    with sources._build_lock(builder):
        p = subprocess.Popen([sys.executable, "-c", _WAITER.format(spec=TINY, d=d)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
        reader.start()
        deadline = time.time() + 180
        while not any("waiting for another process" in x for x in lines):
            assert p.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.1)
        builder.download_and_prepare()
    assert p.wait(timeout=180) == 0, "".join(lines)
    reader.join(timeout=10)
    out = "".join(lines)
    assert "LEN 6" in out and "building dataset" not in out, out


def test_no_download_banner(tmp_path, capfd, caplog):
    with caplog.at_level(logging.INFO, logger="hidrop_jax.data"):
        src = sources.load_source(TINY, "validation", str(tmp_path))
    assert len(src) == 3
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert "Downloading and preparing" not in text and "downloaded and prepared" not in text
    assert "building dataset shapes_vqa/s0_6_3_3" in caplog.text
