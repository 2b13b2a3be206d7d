"""Dead letters on the broker: find the `<queue>.dlq` queues, read them without
losing anything, republish one to its handler's queue, drop one.

Reading is `basic_get` without ack on a channel of our own; closing that
channel (or losing the connection) hands every unacked message back to the
queue, so a crash mid-way loses nothing. A dead letter is only acked after
its replay was confirmed by the broker, or, for a purge, after the caller
recorded it.

Which queues: the reliable handlers of the services configured in
RETAILBUS.services (and the store agent's, per store), found on their classes
the way `nameko run` finds entrypoints, plus RETAILBUS.dlq.queues. We do not
ask the management HTTP API: our broker users carry no management tag (least
privilege), an external cluster's API may sit elsewhere, and the config names
exactly the queues this bus owns.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator

import amqp
from nameko.cli.run import import_service
from nameko.extensions import ENTRYPOINT_EXTENSIONS_ATTR

from bus import partitions, topology
from bus.constants import (H_ATTEMPTS, H_ERROR, H_ERROR_TYPE, H_EXCHANGE, H_FIRST_FAILURE, H_LAST_FAILURE,
                           H_QUEUE, H_ROUTING_KEY, H_USER)
from bus.consumer import ReliableHandler
from bus.publisher import connect
from bus.settings import RetailbusSettings

STORE_AGENT_MODULE = "routing.store_agent"
DLQ_SUFFIX = topology.dead_letter_queue("")

# What a failure wrote; a replay starts the count and the history afresh.
FAILURE_HEADERS = (H_ATTEMPTS, H_ERROR, H_ERROR_TYPE, H_FIRST_FAILURE, H_LAST_FAILURE, H_QUEUE)


def handler_queues(config: dict, settings: RetailbusSettings) -> list[str]:
    """Every reliable handler queue of this bus, sorted."""
    modules = [(service.module, config) for service in settings.services.values()]
    modules += [(STORE_AGENT_MODULE, {**config, "STORE_ID": store.id}) for store in settings.stores]
    queues = set(settings.dlq.queues)
    for module, values in modules:
        for cls in import_service(module):
            for method_name, method in inspect.getmembers(cls, inspect.isfunction):
                for entrypoint in getattr(method, ENTRYPOINT_EXTENSIONS_ATTR, ()):
                    if isinstance(entrypoint, ReliableHandler):
                        queue = (entrypoint._queue.format(**values) if entrypoint._queue else
                                 topology.handler_queue(entrypoint.source_service, entrypoint.event_type,
                                                        cls.name, method_name))
                        handler = settings.handlers.get(f"{cls.name}.{method_name}")
                        queues.update(partitions.partition_queues(queue, handler.partitions if handler else 1))
    return sorted(queues)


def _time(value) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def _text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


@dataclass
class DeadLetter:
    """One parked message as read from `<queue>.dlq`."""

    dlq: str
    body: bytes
    properties: dict
    headers: dict
    delivery_tag: int = field(repr=False, default=0)

    @property
    def id(self) -> str:
        return str(self.properties.get("message_id") or f"unidentified-{self.delivery_tag}")

    @property
    def queue(self) -> str:
        """The queue of the handler that failed: where a replay goes. Named by the DLQ it
        was read from, which DeadLetterStore takes only from the configured handler
        queues; never by a header, which whoever can write to a DLQ writes."""
        return self.dlq[: -len(DLQ_SUFFIX)]

    @property
    def queue_header(self) -> str | None:
        """The queue its `x-retailbus-queue` header names (the consumer that parked it
        writes its own queue there): one that differs from `queue` is not ours."""
        return _text(self.headers.get(H_QUEUE))

    @property
    def type(self) -> str | None:
        return self.properties.get("type")

    @property
    def attempts(self) -> int:
        try:
            return int(self.headers.get(H_ATTEMPTS) or 0)
        except (TypeError, ValueError):
            return 0

    @property
    def first_failure(self) -> datetime | None:
        return _time(self.headers.get(H_FIRST_FAILURE))

    @property
    def last_failure(self) -> datetime | None:
        return _time(self.headers.get(H_LAST_FAILURE))

    @property
    def error(self) -> str:
        return _text(self.headers.get(H_ERROR)) or ""

    @property
    def error_type(self) -> str:
        return _text(self.headers.get(H_ERROR_TYPE)) or ""

    def describe(self) -> dict:
        """Everything `dlq show` prints, JSON-ready."""
        return {
            "id": self.id,
            "type": self.type,
            "dlq": self.dlq,
            "queue": self.queue,
            "attempts": self.attempts,
            "error_type": self.error_type,
            "error": self.error,
            "first_failure": _text(self.headers.get(H_FIRST_FAILURE)),
            "last_failure": _text(self.headers.get(H_LAST_FAILURE)),
            "original_route": {
                "exchange": _text(self.headers.get(H_EXCHANGE)),
                "routing_key": _text(self.headers.get(H_ROUTING_KEY)),
                "queue": self.queue,
            },
            "original_user_id": _text(self.headers.get(H_USER)),
            "correlation_id": self.properties.get("correlation_id"),
            "headers": {k: _text(v) if isinstance(v, bytes) else v for k, v in self.headers.items()},
        }

    def replay_message(self, body: bytes) -> amqp.Message:
        """The message as its handler first saw it: failure headers dropped (the attempt
        count restarts), original route kept, and no user_id property (the broker only
        accepts our own; the original one stays in x-retailbus-original-user-id)."""
        props = {k: v for k, v in self.properties.items() if k not in ("application_headers", "user_id")}
        headers = {k: v for k, v in self.headers.items() if k not in FAILURE_HEADERS}
        props["delivery_mode"] = 2
        return amqp.Message(body, application_headers=headers, **props)


class DeadLetterStore:
    """The dead-letter queues of `queues` (handler queue names) on the broker at `uri`."""

    def __init__(self, uri: str, queues: list[str], *, connect_timeout: float = 5.0,
                 confirm_timeout: float = 10.0):
        self.uri = uri
        self.dlqs = [topology.dead_letter_queue(q) for q in queues]
        self.connect_timeout = connect_timeout
        self.confirm_timeout = confirm_timeout

    @contextmanager
    def _connection(self) -> Iterator[amqp.Connection]:
        conn = connect(self.uri, self.connect_timeout)
        try:
            yield conn
        finally:
            try:
                conn.close()  # unacked gets go back to their queues
            except Exception:
                conn.collect()

    @staticmethod
    def _read(channel, dlq: str, limit: int | None = None) -> Iterator[DeadLetter]:
        """Messages of `dlq`, held unacked on `channel` (its own: a missing queue makes
        the broker close it, which would requeue whatever else it held)."""
        count = 0
        while limit is None or count < limit:
            message = channel.basic_get(dlq, no_ack=False)
            if message is None:
                return
            count += 1
            props = dict(message.properties)
            headers = dict(props.pop("application_headers", None) or {})
            body = message.body if isinstance(message.body, bytes) else message.body.encode()
            yield DeadLetter(dlq, body, props, headers, message.delivery_tag)

    def _scan(self, conn: amqp.Connection) -> Iterator[tuple[amqp.Channel, DeadLetter]]:
        """(channel, dead letter) for every queue, one channel per queue; a queue not
        declared yet (its handler never ran) holds nothing."""
        for dlq in self.dlqs:
            channel = conn.channel()
            try:
                for letter in self._read(channel, dlq):
                    yield channel, letter
            except amqp.exceptions.NotFound:
                continue

    def browse(self, keep: Callable[[DeadLetter], bool] = lambda _: True) -> list[DeadLetter]:
        """The dead letters `keep` accepts, oldest first per queue; all stay in their queues."""
        with self._connection() as conn:
            return [letter for _, letter in self._scan(conn) if keep(letter)]

    def heads(self) -> dict[str, tuple[int, DeadLetter | None]]:
        """Per dead-letter queue: (depth, its oldest dead letter); for the metrics."""
        out = {dlq: (0, None) for dlq in self.dlqs}
        with self._connection() as conn:
            for dlq in self.dlqs:
                channel = conn.channel()
                try:
                    depth = channel.queue_declare(dlq, passive=True).message_count
                except amqp.exceptions.NotFound:
                    continue
                out[dlq] = (depth, next(self._read(channel, dlq, limit=1), None) if depth else None)
        return out

    def settle(self, keep: Callable[[DeadLetter], bool],
               act: Callable[[DeadLetter, Callable[[amqp.Message, str], None]], bool]) -> int:
        """For each dead letter `keep` accepts, call `act(letter, publish)`; when it
        returns True the dead letter is acked (gone), else it stays. `publish(message,
        queue)` returns once the broker confirmed the message into `queue` (default
        exchange, mandatory: an unroutable replay raises instead of vanishing)."""
        done = 0
        with self._connection() as conn:
            publisher = conn.channel()
            publisher.confirm_select()

            def publish(message: amqp.Message, queue: str) -> None:
                publisher.basic_publish_confirm(message, exchange="", routing_key=queue, mandatory=True,
                                                confirm_timeout=self.confirm_timeout)

            for channel, letter in list(self._scan(conn)):
                if keep(letter) and act(letter, publish):
                    channel.basic_ack(letter.delivery_tag)
                    done += 1
        return done
