"""What every command line shares: a user error is one line naming the thing (exit code 2), a
traceback only with `--debug`; logs are quiet (absl, orbax, TFDS at WARNING) unless `--verbose`.

    if __name__ == "__main__":
        cli.run(main)              # argparse mains: main(argv)
        cli.run_absl(main)         # absl mains (flags already defined)
"""

from __future__ import annotations

import logging
import os
import sys

# Mistakes a user can fix from the message: bad values, missing or occupied paths, damaged files.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _take(argv, flag: str) -> bool:
    present = flag in argv
    while flag in argv:
        argv.remove(flag)
    return present


def quiet(verbose: bool) -> None:
    """INFO from our modules only with `verbose`; orbax, absl and TFDS say only what is wrong."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for name in ("absl", "orbax", "jax", "tensorflow_datasets", "grain", "etils"):
        # their WARNINGs are about their own setup ("Using custom data configuration", ...)
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("hidrop_jax").setLevel(logging.INFO)  # our few lines: resume, memory, preemption
    try:
        import absl.logging
        absl.logging.set_verbosity(absl.logging.INFO if verbose else absl.logging.ERROR)
    except ImportError:
        pass
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")


def _quiet_threads() -> None:
    """After a user error, background threads of the libraries (orbax's async restore) die with
    follow-on tracebacks ("Event loop is closed") that bury the one line that matters."""
    import threading
    threading.excepthook = lambda args: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _report(e: BaseException) -> None:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    print(f"error: {msg}", file=sys.stderr)


def _hide_unraisable(debug: bool) -> None:
    """Exceptions Python cannot raise anywhere (e.g. tensorstore calling back into an event loop
    that a failed orbax restore already closed) print as tracebacks: only with `--debug`."""
    if not debug:
        sys.unraisablehook = lambda unraisable: None


def _guarded(main, argv, debug: bool):
    try:
        return main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        _quiet_threads()
        _report(e)
        sys.exit(2)


def run(main, argv=None) -> None:
    """Runs an argparse `main(argv)` with `--debug` / `--verbose` taken out of argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = _take(argv, "--debug"), _take(argv, "--verbose")
    quiet(verbose)
    _hide_unraisable(debug)
    _guarded(main, argv, debug)


def run_absl(main) -> None:
    """`absl.app.run(main)` with the same error and log handling (`--debug`, `--verbose`)."""
    from absl import app
    debug, verbose = _take(sys.argv, "--debug"), _take(sys.argv, "--verbose")
    quiet(verbose)
    _hide_unraisable(debug)
    app.run(lambda argv: _guarded(main, argv, debug))
