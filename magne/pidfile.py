"""`--pid-file`: write this process's pid for the lifetime of a block, remove it after."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from magne.errors import ConfigError


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    if not path:
        yield
        return
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as exc:  # a missing directory, no permission: one line and exit 2, before anything starts
        raise ConfigError(f"cannot write the pid file {path}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
