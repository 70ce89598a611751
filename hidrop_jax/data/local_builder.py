"""A mixin for TFDS builders whose data is made on this machine (generated from code, or read
from the user's own files): nothing is downloaded, so nothing should say so.

TFDS 4.9 prints "Downloading and preparing dataset ..." before a build and "Dataset ...
downloaded and prepared to ..." after it with `termcolor.cprint` to stdout, from
`DatasetBuilder._log_download_bytes` / `_log_download_done`. No flag, logger or verbosity turns
them off (`tfds.disable_progress_bar` only hides the bars), so these two hooks are replaced by
one log line each.
"""

from __future__ import annotations

import logging

log = logging.getLogger("hidrop_jax.data")


class LocalBuilder:
    """Put first in the bases: `class ShapesVqa(LocalBuilder, tfds.core.GeneratorBasedBuilder)`."""

    def _log_download_bytes(self) -> None:
        log.info("building dataset %s in %s", self.info.full_name, self.data_dir)

    def _log_download_done(self) -> None:
        log.info("built dataset %s in %s", self.info.full_name, self.data_dir)
