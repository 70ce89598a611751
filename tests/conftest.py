import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# With libtpu installed (the `tpu` extra, for tests/test_aot.py) JAX would otherwise try to
# open a TPU at start-up, print warnings and take /tmp/libtpu_lockfile; the suite is CPU-only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, os.path.dirname(__file__))
