"""Where retailbus reaches into py-amqp's private parts, and only here.

py-amqp (pinned to one minor version in setup.cfg) gives no public hooks for
how a connection's frames are written and read; the three speed-ups below
replace its writer, its socket reads and its read loop. Every private
attribute they touch (`Connection.frame_writer`, `on_inbound_frame`,
`client_properties`, `Transport._read_buffer`, `_quick_recv`) is asserted to
exist by tests/unit/test_wire_internals.py, so an upgrade fails in CI, not in
a store.

`CoalescingWriter`: all frames of one AMQP connection leave in as few system
calls as possible.

With hundreds of greenthreads publishing (or acking) on one connection, a
send per frame costs us a system call each and costs the broker a read per
tiny packet: measured here, that doubled the broker's CPU per message. So
py-amqp's frame writer is pointed at this object: frames are appended
(copied: py-amqp hands over a view of a buffer it reuses) without any I/O,
which also keeps them in exactly the order they were written, and one
greenthread sends everything pending in one `sendall` per pass of the
event loop.
"""
from __future__ import annotations

import time

import amqp
import eventlet
from amqp.exceptions import UnexpectedFrame
from amqp.method_framing import frame_writer
from eventlet.event import Event

from bus.framing import FRAME_END, FRAME_HEADER

_FRAME_END = FRAME_END[0]
# How long the reader handles frames before it lets other greenthreads run (see FrameReader).
READ_SLICE_SECONDS = 0.001


class CoalescingWriter:
    def __init__(self, conn: amqp.Connection, on_error):
        self._send = conn.transport.write
        self._chunks: list[bytes] = []
        self._wake = Event()
        self._running = True
        self._on_error = on_error
        conn.frame_writer = frame_writer(conn, self)
        self._thread = eventlet.spawn(self._run)

    def write(self, data) -> None:
        """Called by py-amqp's frame writer in place of the socket's write."""
        self._chunks.append(bytes(data))
        if not self._wake.ready():
            self._wake.send(True)

    def close(self) -> None:
        """Send what is pending, then stop."""
        self._running = False
        if not self._wake.ready():
            self._wake.send(True)

    def _run(self):
        try:
            while True:
                self._wake.wait()
                self._wake.reset()
                while self._chunks:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                    self._send(data)
                if not self._running:
                    return
        except Exception as exc:  # the socket is gone: the owner tears the connection down
            self._on_error(exc)


def no_reads_while_publishing(conn: amqp.Connection) -> None:
    """Tell py-amqp the broker will not send connection.blocked: it would otherwise
    drain the socket inside basic_publish, and we read the socket in one place only."""
    conn.client_properties.get("capabilities", {})["connection.blocked"] = False


def buffered_reads(conn: amqp.Connection, size: int = 32768) -> None:
    """Read the socket in blocks instead of exactly the bytes of the next frame part.

    py-amqp asks the socket for the frame header, then the payload, then the
    end byte: nine reads per delivered message. It keeps whatever a read
    returns beyond what it asked for, so asking for a block turns those nine
    system calls (each a greenthread trampoline) into a fraction of one.
    """
    recv = conn.transport.sock.recv
    conn.transport._quick_recv = lambda n: recv(max(n, size))


class FrameReader:
    """Reads a connection's socket in blocks and hands py-amqp each whole frame in them.

    py-amqp reads a frame as three exact reads (header, payload, end byte),
    each through a timeout context and a copy of the rest of its read buffer;
    at a thousand deliveries a second (three frames each) that was ~5 % of the
    erp's CPU. Here one `recv` takes whatever has arrived and a loop cuts
    every complete frame out of it; the frames go to py-amqp's own frame
    handler (`on_inbound_frame`), which assembles messages, counts traffic for
    heartbeats and dispatches methods exactly as it does for its own reads.

    Only the greenthread that owns the connection's reading uses this, once
    the connection is set up, and nothing a frame's handling calls may wait on
    the connection itself. Bytes not yet a whole frame stay in py-amqp's own
    read buffer, so its reads (set-up before, close-ok after) go on from
    exactly where this left off.

    A block holds dozens of deliveries, and handling one (parsing and
    validating its event) costs ~100 us: the reader yields to the other
    greenthreads every `READ_SLICE_SECONDS`. Without that the erp's postings
    writer, the one serial step of its throughput, waited up to tens of ms
    for the reader each time the database answered it.
    """

    def __init__(self, conn: amqp.Connection, size: int = 65536):
        self._transport = conn.transport
        self._on_frame = conn.on_inbound_frame
        self._size = size

    def drain(self, timeout: float) -> None:
        """Handle the whole frames already read; if there were none, wait up to `timeout`
        for bytes (TimeoutError if none came) and handle the whole frames then."""
        if self._handle(b""):
            return
        sock = self._transport.sock
        previous = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            data = sock.recv(self._size)
        finally:
            sock.settimeout(previous)
        if not data:
            raise OSError("Server unexpectedly closed connection")
        self._handle(data)

    def _handle(self, data: bytes) -> bool:
        """Hand py-amqp every whole frame of its read buffer plus `data`; whether there was one."""
        transport = self._transport
        buf = transport._read_buffer + data if transport._read_buffer else data
        pos, end, on_frame, unpack = 0, len(buf), self._on_frame, FRAME_HEADER.unpack_from
        clock = time.perf_counter
        until = clock() + READ_SLICE_SECONDS
        try:
            while end - pos > 7:
                frame_type, channel, size = unpack(buf, pos)
                stop = pos + 7 + size
                if stop >= end:
                    break
                if buf[stop] != _FRAME_END:
                    raise UnexpectedFrame(f"Received frame_end {buf[stop]:#04x} while expecting 0xce")
                payload, pos = buf[pos + 7:stop], stop + 1
                on_frame((frame_type, channel, payload))
                if clock() > until:
                    eventlet.sleep(0)
                    until = clock() + READ_SLICE_SECONDS
        finally:
            transport._read_buffer = buf[pos:] if pos else buf
        return pos > 0
