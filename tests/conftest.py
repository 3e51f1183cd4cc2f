"""Fixtures shared by the test modules."""
from __future__ import annotations

import socket

import pytest


@pytest.fixture
def free_port() -> int:
    """A free TCP port on localhost, for a 2-process gloo group (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
