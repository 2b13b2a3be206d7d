"""Our publish and ack frames are byte for byte what py-amqp would send, and the
frames we read reach py-amqp as its own reads would hand them over."""
import socket

import amqp
import pytest
from amqp.exceptions import UnexpectedFrame
from amqp.method_framing import frame_handler, frame_writer
from amqp.serialization import dumps

from bus.framing import ack_frame, publish_frames
from bus.wire import FrameReader

HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

pytestmark = pytest.mark.unit


class _Sink:
    def __init__(self):
        self.frame_max, self.bytes_sent, self.data = 4096, 0, []
        self.transport = self

    def write(self, data):
        self.data.append(bytes(data))


def py_amqp_frames(body: bytes, headers: dict) -> bytes:
    sink = _Sink()
    message = amqp.Message(body, delivery_mode=2, content_type="application/cloudevents+json",
                           message_id="01JTEST", correlation_id="01JCORR", type="pos.sale.v1",
                           user_id="store-S001", application_headers=headers or None)
    frame_writer(sink, sink)(1, 3, (60, 40), dumps("Bssbb", (0, "store_agent.events", "pos.sale.v1",
                                                             True, False)), message)
    return b"".join(sink.data)


@pytest.mark.parametrize("size", [0, 300, 4088, 4089, 20_000])
@pytest.mark.parametrize("headers", [{}, {"x-retailbus-store": "S001", "x-retailbus-attempts": 2}])
def test_frames_equal_py_amqp(size, headers):
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    ours = publish_frames(3, 4096, "store_agent.events", "pos.sale.v1", body,
                          content_type="application/cloudevents+json", message_id="01JTEST",
                          correlation_id="01JCORR", type="pos.sale.v1", user_id="store-S001", headers=headers)
    assert ours == py_amqp_frames(body, headers)


def test_a_name_longer_than_amqp_allows_is_named():
    with pytest.raises(ValueError, match="routing key is 256 bytes"):
        publish_frames(1, 4096, "x", "k" * 256, b"", content_type=None, message_id="m")


@pytest.mark.parametrize("tag", [1, 300, 2**40 + 7])
def test_ack_frame_equals_py_amqps_basic_ack(tag):
    sink = _Sink()
    frame_writer(sink, sink)(1, 5, (60, 80), dumps("Lb", (tag, False)), None)
    assert ack_frame(5, tag) == b"".join(sink.data)


class _Reading:
    """What FrameReader uses of a py-amqp connection: its transport's socket and read
    buffer, and py-amqp's own frame handler (which assembles the messages here)."""

    def __init__(self, sock):
        self.transport = self
        self.sock, self._read_buffer, self.bytes_recv = sock, b"", 0
        self.received = []
        self.on_inbound_frame = frame_handler(self, lambda *args: self.received.append(args))


def deliveries(count: int, size: int) -> bytes:
    sink = _Sink()
    write = frame_writer(sink, sink)
    for tag in range(1, count + 1):
        message = amqp.Message(bytes([tag]) * size, message_id=f"m{tag}", application_headers={"n": tag})
        write(1, 2, (60, 60), dumps("sLbss", ("ctag", tag, False, "ex", "key")), message)
    return b"".join(sink.data)


@pytest.fixture
def link():
    ours, broker = socket.socketpair()
    yield _Reading(ours), broker
    ours.close()
    broker.close()


def test_frame_reader_hands_py_amqp_every_frame_however_the_bytes_arrive(link):
    conn, broker = link
    data = deliveries(5, 9000) + HEARTBEAT  # bodies of 3 frames each (frame_max 4096)
    reader = FrameReader(conn, size=4096)
    for start in range(0, len(data), 1000):  # pieces that cut headers, payloads and end bytes
        broker.sendall(data[start:start + 1000])
        reader.drain(timeout=5)
    assert [(args[1], args[3].body, args[3].properties) for args in conn.received] == [
        ((60, 60), bytes([tag]) * 9000, {"message_id": f"m{tag}", "application_headers": {"n": tag}})
        for tag in range(1, 6)]
    assert conn.bytes_recv == 5 * 5 + 1 and conn._read_buffer == b""


def test_frame_reader_takes_over_what_py_amqp_read_ahead_and_leaves_it_a_partial_frame(link):
    conn, broker = link
    data = deliveries(2, 10)
    cut = len(data) - 3
    conn._read_buffer = data[:cut]  # py-amqp read this much ahead while setting up
    reader = FrameReader(conn)
    reader.drain(timeout=0.2)  # the whole frames in it are handled without waiting for the socket
    assert [args[3].body for args in conn.received] == [bytes([1]) * 10]
    assert data.endswith(conn._read_buffer + data[cut:])  # the second's last frame, for the next read
    broker.sendall(data[cut:])
    reader.drain(timeout=5)
    assert [args[3].body for args in conn.received] == [bytes([1]) * 10, bytes([2]) * 10]


def test_frame_reader_errors(link):
    conn, broker = link
    reader = FrameReader(conn)
    with pytest.raises(TimeoutError):
        reader.drain(timeout=0.05)
    broker.sendall(HEARTBEAT[:-1] + b"\x00")
    with pytest.raises(UnexpectedFrame, match="frame_end 0x00"):
        reader.drain(timeout=5)


def test_frame_reader_notices_the_broker_closing(link):
    conn, broker = link
    broker.sendall(HEARTBEAT[:4])
    broker.close()
    reader = FrameReader(conn)
    reader.drain(timeout=5)
    with pytest.raises(OSError, match="closed"):
        reader.drain(timeout=5)
    assert conn.bytes_recv == 0 and conn._read_buffer == HEARTBEAT[:4]
