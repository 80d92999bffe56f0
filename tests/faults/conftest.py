"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.proxy import Proxy


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    """A TCP proxy between a worker and the broker, to cut or stall the connection."""
    p = Proxy()
    yield p
    p.close()
