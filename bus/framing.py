"""The frames of one confirmed `basic.publish`, built in one pass.

py-amqp serialises a publish generically (a format string per method, every
property looked up and type-checked): measured with the benchmark's
profile, that was over half of our publisher's CPU per message, and on two
cores every microsecond the publisher spends is taken from the broker.
A publish has a fixed shape, so its method, header and body frames are
packed here directly; the broker sees the same bytes py-amqp would send
(an empty headers table is left out, which reads the same).
"""
from __future__ import annotations

from struct import Struct

from amqp.serialization import dumps

FRAME_END = b"\xce"
FRAME_HEADER = Struct(">BHI")       # type, channel, payload size
_METHOD = Struct(">HHH")            # class 60 (basic), method 40 (publish), reserved short
_HEADER = Struct(">HHQH")           # class 60, weight 0, body size, property flags
_PUBLISH = _METHOD.pack(60, 40, 0)
_PERSISTENT = b"\x02"

# property flag bits (AMQP 0-9-1 basic properties, in wire order)
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE, _CORRELATION_ID = 1 << 15, 1 << 13, 1 << 12, 1 << 10
_MESSAGE_ID, _TYPE, _USER_ID = 1 << 7, 1 << 5, 1 << 4


def _shortstr(value: str, what: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"{what} is {len(data)} bytes; AMQP allows 255")
    return bytes((len(data),)) + data


def publish_frames(channel_id: int, frame_max: int, exchange: str, routing_key: str, body: bytes, *,
                   content_type: str | None, message_id: str | None, correlation_id: str | None = None,
                   type: str | None = None, user_id: str | None = None, headers: dict | None = None,
                   mandatory: bool = True) -> bytes:
    """Method, content header and body frames of a persistent publish, as one bytes."""
    method = b"".join((_PUBLISH, _shortstr(exchange, "exchange"), _shortstr(routing_key, "routing key"),
                       b"\x01" if mandatory else b"\x00"))
    flags, props = _DELIVERY_MODE, []
    if content_type:
        flags |= _CONTENT_TYPE
        props.append(_shortstr(content_type, "content_type"))
    if headers:
        flags |= _HEADERS
        props.append(dumps("F", [headers]))
    props.append(_PERSISTENT)
    if correlation_id:
        flags |= _CORRELATION_ID
        props.append(_shortstr(correlation_id, "correlation_id"))
    if message_id:
        flags |= _MESSAGE_ID
        props.append(_shortstr(message_id, "message_id"))
    if type:
        flags |= _TYPE
        props.append(_shortstr(type, "type"))
    if user_id:
        flags |= _USER_ID
        props.append(_shortstr(user_id, "user_id"))
    header = _HEADER.pack(60, 0, len(body), flags) + b"".join(props)
    parts = [FRAME_HEADER.pack(1, channel_id, len(method)), method, FRAME_END,
             FRAME_HEADER.pack(2, channel_id, len(header)), header, FRAME_END]
    chunk = frame_max - 8  # frame header (7) and end (1)
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        parts += (FRAME_HEADER.pack(3, channel_id, len(piece)), piece, FRAME_END)
    return b"".join(parts)


_ACK = Struct(">BHIHHQB")  # method frame: type 1, channel, size 13; class 60, method 80 (ack), tag, multiple


def ack_frame(channel_id: int, delivery_tag: int) -> bytes:
    """`basic.ack` of one delivery: what `channel.basic_ack(tag)` sends, without its
    generic serialiser (a consumer acks every message)."""
    return _ACK.pack(1, channel_id, 13, 60, 80, delivery_tag, 0) + FRAME_END
