import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

# Datasets built with an empty data.data_dir go to the machine's shared folder
# (hidrop_jax.data.sources.default_data_dir); in tests, a folder of this session, not ~/.cache.
if not os.environ.get("HIDROP_DATA_DIR"):
    import atexit
    import shutil
    import tempfile
    os.environ["HIDROP_DATA_DIR"] = tempfile.mkdtemp(prefix="hidrop_tfds_")
    atexit.register(shutil.rmtree, os.environ["HIDROP_DATA_DIR"], ignore_errors=True)
