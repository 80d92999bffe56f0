"""`--pid-file`: write this process's pid for the lifetime of a block, remove it after."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    if not path:
        yield
        return
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
