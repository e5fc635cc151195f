"""Free TCP ports on 127.0.0.1 for tests that start process groups or Ray nodes."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
