"""Our publish and ack frames are byte for byte what py-amqp would send."""
import amqp
import pytest
from amqp.method_framing import frame_writer
from amqp.serialization import dumps

from services.bus.framing import ack_frame, publish_frames

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
