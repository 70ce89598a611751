import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# With libtpu installed (the `tpu` extra, for tests/test_aot.py) JAX would otherwise try to
# open a TPU at start-up, print warnings and take /tmp/libtpu_lockfile; the suite is CPU-only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent compilation cache for the whole run: pytest-xdist's workers and every process a
# test launches (trainers, launchers, evaluations) inherit it, so a program that many of them
# compile (the tiny train step, above all) is compiled once. A cached executable is the one the
# compiler made, so nothing a test checks changes; tests of the cache itself name their own
# (`train.compile_cache`). A tiny-model launch: 37 s without it, 16 s with a hit.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hidrop_jax_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# Datasets built with an empty data.data_dir go to the machine's shared folder
# (hidrop_jax.data.sources.default_data_dir); in tests, a folder of this session, not ~/.cache.
if not os.environ.get("HIDROP_DATA_DIR"):
    os.environ["HIDROP_DATA_DIR"] = tempfile.mkdtemp(prefix="hidrop_tfds_")
    atexit.register(shutil.rmtree, os.environ["HIDROP_DATA_DIR"], ignore_errors=True)
