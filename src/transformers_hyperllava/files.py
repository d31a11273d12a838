"""Files written whole or not at all: a crash or Ctrl-C never leaves a half-written file where a reader looks."""

import contextlib
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def replaced_when_done(path):
    """Yields a temporary path beside `path` to write to; it replaces `path` when the block succeeds, and is removed on
    any error or Ctrl-C (`path` is then kept as it was). The unique name keeps two writers out of each other's way."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
