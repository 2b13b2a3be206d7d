"""`CoalescingWriter`: all frames of one AMQP connection leave in as few system
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

import amqp
import eventlet
from amqp.method_framing import frame_writer
from eventlet.event import Event


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


def buffered_reads(conn: amqp.Connection, size: int = 32768) -> None:
    """Read the socket in blocks instead of exactly the bytes of the next frame part.

    py-amqp asks the socket for the frame header, then the payload, then the
    end byte: nine reads per delivered message. It keeps whatever a read
    returns beyond what it asked for, so asking for a block turns those nine
    system calls (each a greenthread trampoline) into a fraction of one.
    """
    recv = conn.transport.sock.recv
    conn.transport._quick_recv = lambda n: recv(max(n, size))
