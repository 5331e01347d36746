"""Writing the package's files (plans, tuning entries) so that a reader never sees a partial one."""
from __future__ import annotations

import os
import secrets
from typing import BinaryIO, Callable


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path`` (``.NAME.PID.RANDOM.tmp``), then rename it over
    ``path``: an existing file is replaced whole or, if anything fails, kept as it was. The file is created
    with mode 0o666 less the umask, as ``open(path, "wb")`` would, and never through an existing name
    (O_EXCL). Errors propagate after the temporary file is removed."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
