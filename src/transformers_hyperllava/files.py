"""Files written whole or not at all: a crash or Ctrl-C never leaves a half-written file where a reader looks."""

import contextlib
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

STOP_SIGNALS = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]  # (Windows has no SIGHUP)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_interrupt():
    """Within the block (or the decorated function), SIGTERM (a job's time limit) and SIGHUP (a closed terminal) raise
    KeyboardInterrupt, as Ctrl-C does: the cleanups that run on an exception then take away partial output. Python's
    default for them ends the process at once, running none. The previous handlers are restored afterwards. Only the
    main thread may set a signal handler: run from another, the signals are left as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _interrupted) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def replaced_when_done(path):
    """Yields a temporary path beside `path` to write to; it replaces `path` when the block succeeds, and is removed on
    any error or Ctrl-C (`path` is then kept as it was). The unique name keeps two writers out of each other's way.

    As `open(path, "w")` would: a link is followed (the file it names is replaced, with its permissions, and the link
    stays), and what is no regular file (a pipe, a terminal, /dev/stdout), which cannot be replaced, is written to."""
    path = Path(path)
    if path.exists() and not path.is_file():
        yield path
        return
    path = Path(os.path.realpath(path))
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        yield partial
        if path.exists():
            shutil.copymode(path, partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_replaced_when_done(path):
    """Yields a new temporary folder beside `path` to fill; it replaces `path` (a folder or a file; made if missing)
    when the block succeeds, and is removed on any error or Ctrl-C (`path` is then kept as it was). A link to a folder is
    followed, as by `replaced_when_done`."""
    path = Path(os.path.realpath(path))
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    staging.mkdir(parents=True)
    try:
        yield staging
        if not path.exists():
            os.replace(staging, path)
            return
        # A folder cannot replace a folder that is not empty: the old one is moved aside, and back on any error.
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
        os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old) if old.is_dir() else old.unlink()  # (what was replaced may have been a file)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
