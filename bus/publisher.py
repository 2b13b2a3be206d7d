"""Confirmed, pipelined, mandatory publishing over one AMQP channel per process.

Waiting for each confirm caps a publisher at about a tenth of what the broker
takes, so many publishes are in flight on one channel and each caller (or
group of messages, `publish_many`) is released when its own confirms (or
returns, or nacks) arrive. One greenthread reads the socket, one writes it
(bus/wire.py); publishing itself does no I/O, so delivery tags
follow the order of the frames and py-amqp never sees two readers.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import amqp
import eventlet
import yaml
from eventlet.event import Event
from eventlet.semaphore import Semaphore

from contracts.errors import RetailbusError
from bus import metrics
from bus.framing import publish_frames
from bus.wire import CoalescingWriter, FrameReader, buffered_reads, no_reads_while_publishing

log = logging.getLogger(__name__)

# How long publishing frames a group before it lets other greenthreads run (see _send_slice).
PUBLISH_SLICE_SECONDS = 0.001


class PublishError(RetailbusError):
    """The broker did not take responsibility for the message."""


class UnroutableError(PublishError):
    """Published with `mandatory` and no queue is bound for it: never a silent drop."""


class NackedError(PublishError):
    pass


class BrokerUnavailableError(PublishError):
    pass


@dataclass(slots=True)
class OutgoingMessage:
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str | None = None
    content_type: str = "application/cloudevents+json"
    type: str | None = None
    headers: dict = field(default_factory=dict)
    user_id: str | None = None

    def frames(self, channel_id: int, frame_max: int) -> bytes:
        """Its persistent, mandatory basic.publish, framed (bus/framing.py)."""
        return publish_frames(channel_id, frame_max, self.exchange, self.routing_key, self.body,
                              content_type=self.content_type, message_id=self.message_id,
                              correlation_id=self.correlation_id, type=self.type, user_id=self.user_id,
                              headers=self.headers)


class _Latch:
    """Released when every publish of a group is settled: one wake-up per group."""

    __slots__ = ("left", "event")

    def __init__(self, count: int):
        self.left = count
        self.event = Event()

    def count_down(self):
        self.left -= 1
        if self.left == 0:
            self.event.send(True)


class _Window:
    """At most `size` unconfirmed publishes and `max_bytes` of their bodies (one
    group alone may exceed them). A group takes its slots all at once (groups
    taking slots one by one could each hold half and wait forever), and waiting
    groups are served first come, first served: a release wakes only those that
    now fit, not every waiter. A waiter gives up only when nothing was released
    for `patience` seconds: a window that drains slowly is back-pressure, and
    the producer waits for it rather than failing."""

    def __init__(self, size: int, max_bytes: int | None = None):
        self.size, self.max_bytes = size, max_bytes or 2 ** 62
        self.used = self.used_bytes = 0
        self.last_release = time.monotonic()
        self._waiting: deque[tuple[int, int, Event]] = deque()

    def _fits(self, n: int, nbytes: int) -> bool:
        return not self.used or (self.used + n <= self.size and self.used_bytes + nbytes <= self.max_bytes)

    def acquire(self, n: int, nbytes: int, deadline: float, patience: float) -> bool:
        if not self._waiting and self._fits(n, nbytes):
            self.used, self.used_bytes = self.used + n, self.used_bytes + nbytes
            return True
        turn = (n, nbytes, Event())
        self._waiting.append(turn)
        while turn[2].wait(timeout=max(0.0, deadline - time.monotonic())) is None:
            deadline = self.last_release + patience
            if deadline <= time.monotonic():
                self._waiting.remove(turn)  # timed out: our slots were never taken
                self._wake()
                return False
        return True

    def release(self, n: int, nbytes: int):
        self.used, self.used_bytes = self.used - n, self.used_bytes - nbytes
        self.last_release = time.monotonic()
        self._wake()

    def _wake(self):
        while self._waiting:
            n, nbytes, ready = self._waiting[0]
            if not self._fits(n, nbytes):
                return
            self._waiting.popleft()
            self.used, self.used_bytes = self.used + n, self.used_bytes + nbytes  # taken on the waiter's behalf
            ready.send(True)


class _Pending:
    __slots__ = ("latch", "error", "message_id", "deadline")

    def __init__(self, message_id, deadline, latch: _Latch):
        self.latch = latch
        self.error = None
        self.message_id = message_id
        self.deadline = deadline


def cluster_nodes(uri: str) -> list[str]:
    """The node URIs in `uri`: one, or a cluster's as `amqp://…;amqp://…` (the form
    kombu, hence nameko's AMQP_URI, takes for failover)."""
    nodes = [node.strip() for node in uri.split(";") if node.strip()]
    if not nodes:
        raise ValueError("AMQP URI is empty")
    return nodes


_turns: dict[str, itertools.count] = {}


def connection_params(uri: str, connect_timeout: float, heartbeat: int = 30) -> dict:
    """py-amqp Connection arguments. For a cluster URI each call gives the next
    node in turn, so a loop that reconnects after a failure moves on to another
    node when one is down."""
    nodes = cluster_nodes(uri)
    node = nodes[next(_turns.setdefault(uri, itertools.count())) % len(nodes)] if len(nodes) > 1 else nodes[0]
    parts = urlparse(node)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"AMQP URI must start with amqp:// or amqps://, got {parts.scheme!r}")
    vhost = unquote(parts.path[1:]) if parts.path and parts.path != "/" else "/"
    return dict(
        host=f"{parts.hostname or 'localhost'}:{parts.port or 5672}",
        userid=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        virtual_host=vhost,
        connect_timeout=connect_timeout,
        heartbeat=heartbeat,
        ssl=tls_options(parts.hostname) if parts.scheme == "amqps" else False,
    )


AMQP_SSL_ENV = "RETAILBUS_AMQP_SSL"


def tls_options(host: str | None) -> dict:
    """py-amqp TLS options for an amqps:// URI: RETAILBUS_AMQP_SSL as a YAML mapping
    (`{ca_certs: /path/ca.pem}`, optionally certfile/keyfile), the variable bus.yaml
    also hands nameko as AMQP_SSL. The broker's certificate is always verified, and
    its name (the URI's host) unless the mapping sets `server_hostname`."""
    raw = os.environ.get(AMQP_SSL_ENV, "").strip()
    options = yaml.safe_load(raw) if raw else None
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"{AMQP_SSL_ENV} must be a mapping such as {{ca_certs: /path/ca.pem}}")
    options = dict(options or {})
    options.setdefault("cert_reqs", ssl.CERT_REQUIRED)
    options.setdefault("server_hostname", host)
    return options


def connect(uri: str, connect_timeout: float, **kwargs) -> amqp.Connection:
    """A connected py-amqp Connection to a node of `uri` that answers: each node
    is tried once, in turn, sharing `connect_timeout` between those left; the last
    error is raised when none answers."""
    deadline = time.monotonic() + connect_timeout
    nodes = len(cluster_nodes(uri))
    for left in range(nodes, 0, -1):
        timeout = max(0.1, (deadline - time.monotonic()) / left)
        conn = amqp.Connection(**connection_params(uri, timeout), **kwargs)
        try:
            conn.connect()
            return conn
        except Exception:
            conn.collect()
            if left == 1 or time.monotonic() >= deadline:
                raise
    raise AssertionError("unreachable")


class ConfirmingPublisher:
    """A process-wide publisher; `publish` returns only once the broker confirmed."""

    def __init__(self, uri: str, *, window: int = 1000, confirm_timeout: float = 10.0,
                 connect_timeout: float = 5.0, attempts: int = 3, on_connect=None, window_bytes: int | None = None):
        self.uri = uri
        # Every message names its sender, which the broker validates (bus/identity.py).
        self.user_id = unquote(urlparse(cluster_nodes(uri)[0]).username or "") or None
        self._on_connect = on_connect
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = connect_timeout
        self.attempts = attempts
        self._window = _Window(window, window_bytes)
        self._last_confirm = time.monotonic()  # the broker's last sign of progress
        self._connect_lock = Semaphore(1)
        self._conn = None
        self._channel = None
        self._writer: CoalescingWriter | None = None
        self._reader = None  # the greenthread of _read_loop
        self._tags = None
        self._counters: dict[tuple[str, str], object] = {}
        self._next_expiry_check = 0.0
        self._pending: dict[int, _Pending] = {}
        self._floor = 0
        self._by_message_id: dict[str, _Pending] = {}
        self._closed = False
        self._nacked = False

    # -- public API ---------------------------------------------------------

    def publish(self, message: OutgoingMessage, timeout: float | None = None) -> None:
        """Publish and wait for the confirm; retries a lost connection a bounded number of times.

        Raises UnroutableError at once (retrying cannot help), PublishError when the
        deadline passes: it never hangs on a dead connection.
        """
        error = self.publish_many([message], timeout)[0]
        if error is not None:
            raise error

    def publish_many(self, messages: list[OutgoingMessage],
                     timeout: float | None = None) -> list[PublishError | None]:
        """Publish all with as many in flight as the window allows; result i is None
        when message i was confirmed, else its error. Lost ones are retried
        (bounded) within the deadline; unroutable ones are not."""
        span = timeout or self.confirm_timeout
        deadline = time.monotonic() + span
        results: list[PublishError | None] = [None] * len(messages)
        for message in messages:
            if message.user_id is None:
                message.user_id = self.user_id
        todo = list(range(len(messages)))
        for attempt in range(self.attempts):
            errors = self._send([messages[i] for i in todo], deadline, span)
            retry = []
            for i, error in zip(todo, errors):
                results[i] = error
                if isinstance(error, (BrokerUnavailableError, NackedError)):
                    retry.append(i)
            remaining = deadline - time.monotonic()
            if not retry or remaining <= 0 or attempt == self.attempts - 1:
                break
            todo = retry
            eventlet.sleep(min(remaining, 0.05 * 2 ** attempt * (1 + random.random())))
        outcomes: dict[tuple[str, str], int] = {}
        for message, error in zip(messages, results):
            key = (message.exchange, "confirmed" if error is None else
                   "unroutable" if isinstance(error, UnroutableError) else "failed")
            outcomes[key] = outcomes.get(key, 0) + 1
        for (exchange, outcome), n in outcomes.items():
            self._count(exchange, outcome, n)
        return results

    def close(self):
        self._closed = True
        self._teardown(BrokerUnavailableError("publisher closed"))

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # -- internals ----------------------------------------------------------

    def _count(self, exchange: str, outcome: str, n: int = 1):
        counter = self._counters.get((exchange, outcome))
        if counter is None:
            counter = self._counters[(exchange, outcome)] = metrics.PUBLISHED.labels(exchange, outcome)
        counter.inc(n)

    def _send(self, messages: list[OutgoingMessage], deadline: float, span: float) -> list[PublishError | None]:
        """One round: publish the group (window-sized slices), wait for every settlement."""
        errors: list[PublishError | None] = []
        size, max_bytes = self._window.size, self._window.max_bytes
        first, nbytes = 0, 0
        for i, message in enumerate(messages):
            if i > first and (i - first == size or nbytes + len(message.body) > max_bytes):
                errors += self._send_slice(messages[first:i], nbytes, deadline, span)
                first, nbytes = i, 0
            nbytes += len(message.body)
        if first < len(messages):
            errors += self._send_slice(messages[first:], nbytes, deadline, span)
        return errors

    def _send_slice(self, messages: list[OutgoingMessage], nbytes: int, deadline: float,
                    span: float) -> list[PublishError | None]:
        if not self._window.acquire(len(messages), nbytes, deadline, span):
            return [PublishError(f"publish window full and not draining for {span:g}s")] * len(messages)
        try:
            try:
                channel = self._ensure_connected(deadline)
            except BrokerUnavailableError as exc:
                return [exc] * len(messages)
            latch = _Latch(len(messages))
            # The broker gets the whole span for these confirms from now: a slice that
            # waited for the window must not read as a dead connection (which would
            # fail everything in flight) just because its caller's clock ran.
            expires = max(deadline, time.monotonic() + span)
            pendings = [_Pending(m.message_id, expires, latch) for m in messages]
            # No I/O happens here (frames go to the coalescing writer), so delivery
            # tags are handed out in exactly the order the frames are sent.
            write, frame_max = self._writer.write, self._conn.frame_max
            if not self._pending:  # the progress clock starts when the window stops being idle
                self._last_confirm = time.monotonic()
            clock = time.perf_counter
            until = clock() + PUBLISH_SLICE_SECONDS
            for sent, (message, pending) in enumerate(zip(messages, pendings)):
                if clock() > until:
                    # Framing a slice of hundreds holds the hub for milliseconds: the other
                    # greenthreads (a till's sale) run between slices. A tag is still taken
                    # and its frames written with no yield in between, so tags stay in order.
                    eventlet.sleep(0)
                    until = clock() + PUBLISH_SLICE_SECONDS
                    if self._channel is not channel:  # torn down meanwhile: the rest never left
                        error = BrokerUnavailableError("connection lost while publishing")
                        for unsent in pendings[sent:]:
                            unsent.error = error
                            latch.count_down()
                        break
                tag = next(self._tags)
                self._pending[tag] = pending
                self._by_message_id[message.message_id] = pending
                try:
                    if not channel.is_open:
                        raise amqp.exceptions.RecoverableChannelError("channel closed")
                    write(message.frames(channel.channel_id, frame_max))
                except Exception as exc:
                    self._pending.pop(tag, None)
                    error = BrokerUnavailableError(f"publish failed: {exc}")
                    for unsent in pendings[sent:]:
                        unsent.error = error
                        latch.count_down()
                    self._teardown(error)
                    break
            started = time.monotonic()
            latch.event.wait()  # no timer per publish: the read loop expires overdue ones
            metrics.CONFIRM_SECONDS.observe(time.monotonic() - started)
            return [p.error for p in pendings]
        finally:
            self._window.release(len(messages), nbytes)

    def _ensure_connected(self, deadline: float):
        channel = self._channel
        if channel is not None:
            return channel
        if self._closed:
            raise BrokerUnavailableError("publisher closed")
        with self._connect_lock:
            if self._channel is not None:
                return self._channel
            timeout = max(0.1, min(self.connect_timeout, deadline - time.monotonic()))
            try:
                conn = connect(self.uri, timeout)
                channel = conn.channel()
                channel.confirm_select()
                if self._on_connect is not None:
                    self._on_connect(channel)
            except Exception as exc:
                raise BrokerUnavailableError(f"cannot connect to the broker: {exc}") from exc
            no_reads_while_publishing(conn)
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            self._conn, self._tags, self._floor, self._nacked = conn, itertools.count(1), 0, False
            self._writer = CoalescingWriter(conn, lambda exc: self._teardown(
                BrokerUnavailableError(f"connection lost: {exc}"), conn))
            buffered_reads(conn)
            self._channel = channel
            self._reader = eventlet.spawn(self._read_loop, conn)
            metrics.BROKER_CONNECTED.labels("publisher").set(1)
            return channel

    def _read_loop(self, conn):
        reader = FrameReader(conn)
        try:
            while self._conn is conn:
                try:
                    reader.drain(timeout=0.5)
                except TimeoutError:
                    pass
                conn.heartbeat_tick()  # only queues a frame: the writer sends it
                self._expire(conn)
                if self._nacked:
                    # A channel that saw a quorum queue's leader die can go on nacking
                    # everything (RabbitMQ 3.10); a new connection (maybe to another
                    # node) recovers. The nacked publishes are retried on it.
                    self._nacked = False
                    self._teardown(BrokerUnavailableError("the broker nacked: reconnecting"), conn)
        except Exception as exc:
            if self._conn is conn:
                log.warning("publisher connection lost: %s", exc)
                self._teardown(BrokerUnavailableError(f"connection lost: {exc}"), conn)

    def _expire(self, conn):
        """A confirm overdue while no confirm at all came for `confirm_timeout` means a
        dead or stuck connection: everyone in flight fails (and retries on a new one).
        A broker that confirms slowly under a burst is not stuck: its publishers wait
        (back-pressure) instead of failing and sending everything again. Checked about
        twice a second."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + 0.5
        if now - self._last_confirm >= self.confirm_timeout and any(
                entry.deadline <= now for entry in self._pending.values()):
            self._teardown(BrokerUnavailableError(
                f"no confirm from the broker within {self.confirm_timeout:.1f}s"), conn)

    def _resolve(self, delivery_tag: int, multiple: bool, error_factory=None):
        self._last_confirm = time.monotonic()
        pending = self._pending
        if multiple:  # tags are consecutive: everything above the last multiple, up to this one
            for tag in range(self._floor + 1, delivery_tag + 1):
                entry = pending.pop(tag, None)
                if entry is not None:
                    self._finish(entry, error_factory)
            self._floor = max(self._floor, delivery_tag)
        else:
            entry = pending.pop(delivery_tag, None)
            if entry is not None:
                self._finish(entry, error_factory)

    def _finish(self, entry: _Pending, error_factory):
        self._by_message_id.pop(entry.message_id, None)
        if error_factory is not None and entry.error is None:
            entry.error = error_factory()
        entry.latch.count_down()

    def _on_ack(self, delivery_tag, multiple):
        self._resolve(delivery_tag, multiple)

    def _on_nack(self, delivery_tag, multiple):
        self._resolve(delivery_tag, multiple, lambda: NackedError("the broker refused the message (nack)"))
        self._nacked = True

    def _on_return(self, exc, exchange, routing_key, message):
        entry = self._by_message_id.get(message.properties.get("message_id"))
        if entry is not None:
            entry.error = UnroutableError(
                f"no queue bound for routing key {routing_key!r} on exchange {exchange!r}")

    def _teardown(self, error: PublishError, conn=None):
        if conn is not None and conn is not self._conn:
            return
        conn, self._conn, self._channel = self._conn, None, None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        pending, self._pending = self._pending, {}
        self._by_message_id = {}
        for entry in pending.values():
            entry.error = entry.error or error
            entry.latch.count_down()
        metrics.BROKER_CONNECTED.labels("publisher").set(0)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not eventlet.getcurrent():
            # Stopped before its socket closes: a greenthread left waiting on a closed
            # descriptor blocks the next socket that gets that number ("Second
            # simultaneous read"), e.g. a database connection of the same process.
            reader.kill()
        if conn is not None:
            try:
                conn.collect()
            except Exception:
                pass
