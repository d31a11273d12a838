"""Files written whole or not at all: a crash or Ctrl-C never leaves a half-written file where a reader looks."""

import contextlib
import os
import shutil
import uuid
from pathlib import Path


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
