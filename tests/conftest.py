"""Test set-up shared by every test module.

No test may reach the real network: the OpenAI client is mocked with respx (see
`upstream_mock`), and on top of that any socket connection to an address outside the loopback
range fails the test at once.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# app.py builds the app at import time from the environment: give it a harmless one.
os.environ.setdefault("OPENAI_API_KEY", "sk-test-not-a-real-key")
os.environ.setdefault("OPENAI_BASE_URL", "http://upstream.invalid/v1")

REPO = Path(__file__).resolve().parent.parent


def fixtures_dir() -> Path:
    """The recorded OpenAI streams: $FIXTURES_DIR, else ../shared/fixtures beside the repo."""
    for candidate in (os.environ.get("FIXTURES_DIR"), REPO.parent / "shared" / "fixtures", "/work/shared/fixtures"):
        if candidate and Path(candidate, "README.md").is_file():
            return Path(candidate)
    raise RuntimeError("shared/fixtures not found: set FIXTURES_DIR to the recorded streams' folder")


class RealNetworkBlocked(AssertionError):
    pass


_real_connect = socket.socket.connect
_real_getaddrinfo = socket.getaddrinfo
_real_connect_ex = socket.socket.connect_ex


def _check_address(sock: socket.socket, address: Any) -> None:
    if sock.family == socket.AF_UNIX:
        return
    host = address[0] if isinstance(address, tuple) else address
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    raise RealNetworkBlocked(f"a test tried to reach the network: {address!r}")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check_address(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check_address(self, address)
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    if name not in (None, "localhost"):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise RealNetworkBlocked(f"a test tried to resolve a host name: {name!r}") from None
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def block_real_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """The collector off (after one collection) for the test: what is freed, reference counting freed."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
