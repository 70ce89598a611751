"""One way to write a directory so that a crash never leaves one that looks complete.

Checkpoints (`checkpoint.save_params`), Hugging Face exports (`hf.save`) and vision towers are
all written into a temporary sibling and renamed into place when whole; a previous directory is
removed only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Fails (naming the path) unless `out` is absent, empty, or may be replaced."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out, *, overwrite: bool = False):
    """Yields a temporary sibling of `out` to fill; on success it becomes `out` in one rename.
    On any failure the temporary is removed and `out` is as it was."""
    out = Path(out).absolute()
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared export
        check_out_dir(out, overwrite)  # it may have appeared meanwhile
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
