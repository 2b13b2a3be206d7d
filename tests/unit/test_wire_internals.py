"""bus/wire.py leans on py-amqp's private attributes. These tests fail when an
upgrade of py-amqp renames or drops one, so the break shows in CI, not in a store."""
from __future__ import annotations

import socket

import amqp
import pytest
from amqp.method_framing import frame_writer
from amqp.transport import TCPTransport

from bus import wire

pytestmark = pytest.mark.unit


def test_connection_exposes_the_frame_hooks_we_replace():
    conn = amqp.Connection(host="127.0.0.1:1")  # not connected: attributes only
    for hook in ("on_inbound_frame", "frame_writer"):  # read by FrameReader, set by CoalescingWriter
        assert isinstance(getattr(type(conn), hook), property), hook
    conn.on_inbound_frame = handler = object()
    conn.frame_writer = writer = frame_writer(conn, wire.CoalescingWriter.__new__(wire.CoalescingWriter))
    assert conn.on_inbound_frame is handler and conn.frame_writer is writer
    assert isinstance(conn.client_properties, dict)


def test_capabilities_can_be_told_the_broker_never_blocks():
    conn = amqp.Connection(host="127.0.0.1:1")
    conn.client_properties["capabilities"] = dict(conn.negotiate_capabilities)
    wire.no_reads_while_publishing(conn)
    assert conn.client_properties["capabilities"]["connection.blocked"] is False


def test_transport_reads_through_the_buffer_and_quick_recv_we_replace():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    transport = TCPTransport(f"127.0.0.1:{server.getsockname()[1]}", connect_timeout=5)
    transport.connect()
    peer, _ = server.accept()
    try:
        assert transport._read_buffer == b""
        asked = []
        recv = transport.sock.recv
        transport._quick_recv = lambda n: asked.append(n) or recv(max(n, 64))
        peer.sendall(b"abcdef")
        assert bytes(transport._read(2)) == b"ab"  # py-amqp reads through our _quick_recv ...
        assert asked and transport._read_buffer == b"cdef"  # ... and keeps the rest in _read_buffer
    finally:
        peer.close()
        transport.close()
        server.close()
