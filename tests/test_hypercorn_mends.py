"""assistant/hypercorn_mends.py, in process: hypercorn's handshake declines compression unless
asked to take it (the ping loop is tested end to end: tests/test_e2e.py, tests/test_shutdown.py)."""

from __future__ import annotations

import pytest
from hypercorn.protocol.ws_stream import Handshake, WSStream

from assistant.hypercorn_mends import mend_hypercorn_websockets

OFFERS = [
    b"permessage-deflate; client_max_window_bits",
    b"x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
    b"x-unknown-extension",
]


@pytest.fixture(autouse=True)
def hypercorn_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls, name in ((Handshake, "accept"), (WSStream, "handle"), (WSStream, "_send_pings")):
        monkeypatch.setattr(cls, name, getattr(cls, name))


def answered_extensions(offer: bytes) -> str | None:
    _, headers, _ = Handshake([(b"sec-websocket-extensions", offer)], "1.1").accept(None, [])
    value = dict(headers).get(b"sec-websocket-extensions")
    return None if value is None else value.decode().split(";")[0]  # the extension, without its parameters


@pytest.mark.parametrize("offer", OFFERS)
def test_compression_is_declined_by_default(offer: bytes) -> None:
    mend_hypercorn_websockets(compression=False)
    assert answered_extensions(offer) is None


def test_compression_is_taken_when_asked_for_as_hypercorn_takes_it() -> None:
    mend_hypercorn_websockets(compression=True)
    assert answered_extensions(OFFERS[0]) == "permessage-deflate"
    assert answered_extensions(OFFERS[1]) == "permessage-deflate"
    assert answered_extensions(OFFERS[2]) is None  # nothing hypercorn knows


def test_calling_it_again_changes_only_the_choice() -> None:
    mend_hypercorn_websockets(compression=True)
    mend_hypercorn_websockets(compression=False)
    assert answered_extensions(OFFERS[0]) is None
    mend_hypercorn_websockets(compression=True)
    assert answered_extensions(OFFERS[0]) == "permessage-deflate"
