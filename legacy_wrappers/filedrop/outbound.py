"""Events into batch files for a legacy job, acked only once the file is durable.

`BatchFileWriter` (DependencyProvider) buffers rows and rolls a file by row
count or age: write a hidden temp file, fsync it and the folder, record its
row keys in the ledger as pending, atomic rename, fsync the folder, then the
done marker. `batch_file_consumer` (Entrypoint) holds every delivery until
the file its row went into is durable and only then acks. A crash before the
rename leaves the hidden temp file: its keys are dropped, the file removed,
and the unacked messages come back and are written again, whole. A crash
after the rename finds the keys recorded, so redelivered events are not
written twice, even when the legacy job has taken the file away already: the
temp name is what tells the two apart, never whether the file is still there.

`reliable_handler` acks each message when its worker ends, which is right
for one effect per message and wrong for a file of many: hence this small
consumer of its own, using the same topology (queue, retry names, DLQ).
"""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from functools import partial
from itertools import count

import amqp
import eventlet
from eventlet.semaphore import Semaphore
from nameko.extensions import DependencyProvider, Entrypoint

from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from legacy_wrappers.filedrop import metrics
from legacy_wrappers.filedrop.files import fsync_dir
from legacy_wrappers.filedrop.inbound import FileLedger
from bus import journal, topology
from bus.constants import H_ERROR, H_ERROR_TYPE, H_QUEUE
from bus.extensions import BusConnection, container_settings
from bus.publisher import OutgoingMessage, PublishError, connection_params

log = logging.getLogger(__name__)


def fixed_record(fields, values: dict) -> str:
    """One fixed-width line; a value that does not fit is an error, never truncated."""
    line = []
    for f in fields:
        width = f.end - f.start + 1
        v = values.get(f.name)
        text = "" if v is None else (f"{v:0{width}d}" if f.type == "int" else str(v))
        if len(text) > width:
            raise ValueError(f"{f.name}={v!r} does not fit in {width} characters")
        line.append(text.ljust(width))
    return "".join(line)


class BatchFileWriter(DependencyProvider):
    """`self.<attr>.add(key, values)` buffers one record of the outbound file `name`."""

    shared = FileLedger()
    hop_journal = journal.Journal()  # a durable file's rows go to the journal: "written", file and line

    def __init__(self, name: str):
        self.name = name

    @property
    def cfg(self):
        return self.shared.drops.outbound[self.name]

    def setup(self):
        self.cfg.folder.mkdir(parents=True, exist_ok=True)
        self._rows: dict[str, str] = {}
        self._refs: dict[str, list[str]] = {}
        self._acks: list = []
        self._oldest: float | None = None
        self._lock = Semaphore(1)
        self._seq = count(1)
        self._recover()

    def start(self):
        self._running = True
        self._timer = self.container.spawn_managed_thread(self._roll_by_age, identifier=f"batch_file:{self.name}")

    def stop(self):
        self._running = False
        self._timer.wait()
        self.flush()

    def kill(self):
        self._running = False
        self._timer.kill()

    def get_dependency(self, worker_ctx):
        return self

    def _recover(self):
        """Finish what a crash interrupted: a pending file still under its temp name was
        never renamed, so no legacy job saw it: its keys are dropped (the temp file goes
        with the strays). Any other pending file was renamed (a rename is atomic and the
        temp name was durable before the keys were recorded): it keeps its keys and gets
        its marker if it is still there; if it is gone, the legacy job took it."""
        ledger, folder = self.shared.ledger, self.cfg.folder
        for name in ledger.out_pending_files(self.name):
            if (folder / f".{name}.tmp").exists():
                ledger.out_abandon(self.name, name)  # before the temp file goes: never the reverse
                continue
            if (folder / name).exists():
                (folder / (name + self.cfg.marker_suffix)).touch()
                fsync_dir(folder)
            else:
                log.warning("batch file %s: %s was taken before its ledger entry was finished; "
                            "its events are not written again", self.name, name)
            ledger.out_written(self.name, name)
        for stray in folder.glob(f".{self.cfg.prefix}_*.tmp"):
            log.warning("batch file %s: removing unfinished %s", self.name, stray.name)
            stray.unlink()

    def add(self, key: str, values: dict, refs: tuple[str, ...] = ()) -> bool:
        """Buffer a record under its idempotency key; False if it is in a file already.
        `refs`: other names the record is traced by (`retailbus trace`), opaque here."""
        line = fixed_record(self.cfg.fields, values)
        if key in self._rows or self.shared.ledger.written_keys(self.name, [key]):
            return False
        self._rows[key] = line
        self._refs[key] = [r for r in refs if r]
        self._oldest = self._oldest or time.monotonic()
        return True

    def hold(self, ack) -> None:
        """Call `ack()` once everything added so far is in a durable file."""
        self._acks.append(ack)
        if len(self._rows) >= self.cfg.roll_rows:
            self.flush()

    def _roll_by_age(self):
        while self._running:
            eventlet.sleep(min(0.2, self.cfg.roll_seconds))
            if self._acks and (self._oldest is None or time.monotonic() - self._oldest >= self.cfg.roll_seconds):
                self.flush()

    def flush(self):
        with self._lock:
            rows, acks, refs = self._rows, self._acks, self._refs
            self._rows, self._acks, self._refs, self._oldest = {}, [], {}, None
            if rows:
                name = self._write(rows)
                # line 1 is the header: the n-th record is on line n + 1
                journal.record("written", detail={"file": name, "folder": str(self.cfg.folder)}, items=[
                    {"key": key, "row": n, "refs": refs.get(key, [])} for n, key in enumerate(rows, start=2)])
            for ack in acks:
                ack()

    def _write(self, rows: dict[str, str]):
        cfg, folder = self.cfg, self.cfg.folder
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        name = f"{cfg.prefix}_{stamp}_{next(self._seq):04d}{cfg.suffix}"
        tmp, final = folder / f".{name}.tmp", folder / name
        total = 0
        if cfg.total_of:
            spec = next(f for f in cfg.fields if f.name == cfg.total_of)
            total = sum(int(line[spec.start - 1:spec.end]) for line in rows.values())
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(f"{cfg.header_prefix}{name}\n")
            for line in rows.values():
                f.write(line + "\n")
            f.write(f"{cfg.trailer_prefix}{len(rows):09d}{total:015d}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(folder)  # the temp name is durable before the ledger names the file (see _recover)
        self.shared.ledger.out_pending(self.name, name, list(rows))
        os.replace(tmp, final)
        fsync_dir(folder)
        (folder / (name + cfg.marker_suffix)).touch()
        fsync_dir(folder)
        self.shared.ledger.out_written(self.name, name)
        metrics.ROWS.labels(self.name, "written").inc(len(rows))
        metrics.FILES.labels(self.name, "written").inc()
        log.info("batch file %s: wrote %s (%d rows)", self.name, name, len(rows),
                 extra={"outcome": "written"})
        return name


class BatchFileConsumer(Entrypoint):
    """Consume `event_types` from `source_service` into the BatchFileWriter `writer`."""

    bus = BusConnection()

    def __init__(self, source_service: str, event_types: tuple[str, ...], writer: str, **kwargs):
        self.source_service, self.event_types, self.writer_name = source_service, event_types, writer
        super().__init__(**kwargs)

    def setup(self):
        self.uri, settings = container_settings(self.container.config)
        self.exchange = topology.events_exchange(self.source_service)
        self.queue = topology.handler_queue(self.source_service, "batch", self.container.service_name,
                                            self.method_name)
        self.writer = next(d for d in self.container.dependencies
                           if isinstance(d, BatchFileWriter) and d.name == self.writer_name)
        self.prefetch = min(10000, 2 * self.writer.cfg.roll_rows)
        self.connect_timeout = settings.publisher.connect_timeout
        self.queue_type = settings.queue_type
        self._lock, self._channel, self._running = Semaphore(1), None, False

    def start(self):
        self._running = True
        self._loop = self.container.spawn_managed_thread(self._run, identifier=f"batch_consumer:{self.queue}")

    def stop(self):
        self._running = False
        self._loop.wait()

    def kill(self):
        self._running = False
        self._loop.kill()

    def _run(self):
        while self._running:
            conn = None
            try:
                conn = amqp.Connection(**connection_params(self.uri, self.connect_timeout))
                conn.connect()
                channel = conn.channel()
                channel.basic_qos(0, self.prefetch, False)
                for event_type in self.event_types:
                    topology.declare_handler_queues(channel, self.exchange, event_type, self.queue, [],
                                                    queue_type=self.queue_type)
                channel.basic_consume(self.queue, callback=self._deliver)
                self._channel = channel
                while self._running:
                    try:
                        conn.drain_events(timeout=0.5)
                    except TimeoutError:
                        pass
                    if self._lock.acquire(blocking=False):
                        try:
                            conn.heartbeat_tick()
                        finally:
                            self._lock.release()
                self.writer.flush()  # hand back what is held while we can still ack
                with self._lock:
                    self._channel = None
                    conn.close()
            except Exception as exc:
                self._channel = None
                if conn is not None:
                    conn.collect()
                if self._running:
                    log.warning("batch consumer %s: connection lost (%s); reconnecting", self.queue, exc)
                    eventlet.sleep(1)

    def _deliver(self, message: amqp.Message):
        try:
            event = CloudEvent.from_json(message.body)
            payload = event.payload()
        except ContractError as exc:
            self.container.spawn_managed_thread(partial(self._park, message, exc))
            return
        self.container.spawn_worker(
            self, (payload, event), {}, context_data={"correlation_id": event.correlationid},
            handle_result=partial(self._handled, message))

    def _handled(self, message, worker_ctx, result, exc_info):
        if exc_info is None:
            self.writer.hold(partial(self._settle, message))
        else:
            eventlet.spawn_n(self._park, message, exc_info[1])
        return result, exc_info

    def _settle(self, message, ack=True):
        if message.channel is not self._channel:
            return  # the old channel's deliveries come back by themselves
        with self._lock:
            try:
                if ack:
                    message.channel.basic_ack(message.delivery_tag)
                else:
                    message.channel.basic_reject(message.delivery_tag, requeue=True)
            except Exception as exc:
                log.warning("batch consumer %s: could not settle: %s", self.queue, exc)

    def _park(self, message, exc):
        """A message that cannot become a record goes to `<queue>.dlq` with the reason."""
        props = message.properties
        headers = dict(props.get("application_headers") or {})
        headers.update({H_ERROR: str(exc)[:2000], H_QUEUE: self.queue, H_ERROR_TYPE: type(exc).__name__})
        try:
            self.bus.publisher.publish(OutgoingMessage(
                exchange=topology.FAILED_EXCHANGE, routing_key=topology.dead_letter_queue(self.queue),
                body=message.body,
                message_id=props.get("message_id") or "unidentified", headers=headers,
                correlation_id=props.get("correlation_id")))
        except PublishError as err:
            log.error("batch consumer %s: cannot park a message (%s); requeueing", self.queue, err)
            eventlet.sleep(1)
            return self._settle(message, ack=False)
        log.warning("batch consumer %s: parked a message: %s", self.queue, exc, extra={"outcome": "dead_lettered"})
        self._settle(message)


batch_file_consumer = BatchFileConsumer.decorator
