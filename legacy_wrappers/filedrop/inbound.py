"""`file_drop`: the entrypoint that turns complete legacy batch files into row chunks.

Per drop (config/filedrops.yaml) one greenthread watches the folder (woken by
inotify where it can, else every `poll_seconds`: wakeup.py) and takes a file
only once its completion rule holds. Row keys are `<sha256>:<row>` and
a file seen before (same sha256) publishes nothing, so the hash must be known
before the first row leaves: pass 1 streams the file for its sha256, its
header/trailer and record count, and validates every row only when the
outcome depends on it (`reject_file`, or a trailer control total); otherwise
it is a cheap hashing count. Pass 2 streams the same open file again (never
the name: it may hold another file by then), reading only bytes that match
what pass 1 hashed (records.VerifiedReader), validates, writes the reject
report and hands rows to the service method in chunks of up to `chunk_rows`,
`inflight_chunks` at a time; the ledger checkpoints the last row of the
contiguous chunks confirmed (once per `inflight_chunks` of them), so a killed
wrapper resumes after that row, whatever the chunk size or the layout are by
then (the rows confirmed since and those in flight at the kill are sent again;
consumers drop them by row key).
"""
from __future__ import annotations

import csv
import fnmatch
import logging
import os
import time
from bisect import bisect_right

import eventlet
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from eventlet.event import Event
from nameko.extensions import Entrypoint, SharedExtension

from bus.extensions import relax_gc
from contracts.errors import RetailbusError
from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop import metrics
from legacy_wrappers.filedrop.files import RefusedFileError, archive_folder, move_unique, open_regular
from legacy_wrappers.filedrop.layout import FileProblemError, Layout, Outcome
from legacy_wrappers.filedrop.ledger import Ledger, identity
from legacy_wrappers.filedrop.rowcode import GoodRows
from legacy_wrappers.filedrop.wakeup import FolderWakeup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowChunk:
    """What the service method receives: rows of one file, in file order, as `GoodRows`
    (rowcode.py): each row's batch item `{"row": n, "idempotencykey": "<sha256>:<n>",
    "data": values}` already as JSON text, its number and its name. A file makes
    millions of rows: each is written once, in the row loop, and is one object."""

    drop: str
    file: str
    sha256: str
    index: int
    rows: GoodRows
    doubtful: list[int]  # rows whose values break the drop's `values_schema`: check this chunk in full

    def take_rows(self) -> GoodRows:
        """The rows, handed over once: the chunk lets go of them, so they are freed as
        soon as the taker is done with them, not when the worker ends (after the confirm)."""
        rows = GoodRows(self.rows.items, self.rows.numbers, self.rows.names)
        self.rows.items, self.rows.numbers, self.rows.names = [], [], []
        return rows


class ChunkFailedError(RetailbusError):
    """Raised when a chunk of rows could not be published; the file is retried from its last checkpoint."""


class FileLedger(SharedExtension):
    """The container's drops config and ledger, shared by every drop and writer."""

    _drops = _ledger = None

    def setup(self):
        # A file pass keeps ~3 container objects per row alive for a chunk's life (row
        # tuples, values, items: tens of thousands at a time). With CPython's default
        # first-generation threshold (700) the cyclic collector runs every ~175 rows,
        # scans them again and again and promotes them into older generations, whose
        # full collections follow: 3-5 s of CPU for 1M rows, ~0.1 s at 50,000. The
        # cycles it exists for (a few per chunk, the rows freed already) wait a little
        # longer. `relax_gc` raises the process's threshold (never lowers it).
        relax_gc()

    @property
    def drops(self) -> fd_config.FileDrops:
        """Loaded on first use: nameko sets extensions up in no fixed order."""
        if self._drops is None:
            self._drops = fd_config.for_container(self.container.config)
        return self._drops

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.drops.ledger)
        return self._ledger

    def stop(self):
        if self._ledger is not None:
            self._ledger.close()

    kill = stop


class FileDrop(Entrypoint):
    """`values_schema`: the JSON schema the service checks row values against (e.g. its
    contract's); the row loop tests what it can of it on every row (rowcode.py).
    `name_fields`: the fields whose values, joined by "/", name a row in the journal."""

    shared = FileLedger()

    def __init__(self, drop: str, values_schema: dict | None = None, name_fields: tuple[str, ...] = (),
                 **kwargs):
        self.drop = drop
        self.values_schema = values_schema
        self.name_fields = name_fields
        super().__init__(**kwargs)

    def setup(self):
        try:
            self.cfg = self.shared.drops.inbound[self.drop]
        except KeyError:
            raise fd_config.FileDropConfigError(
                f"no inbound drop {self.drop!r} in filedrops.yaml "
                f"(have: {', '.join(self.shared.drops.inbound) or 'none'})") from None
        self.folder = self.cfg.folder
        self.work = self.folder / ".work"
        self.error = self.folder / "error"
        for folder in (self.folder, self.work, self.error):
            folder.mkdir(parents=True, exist_ok=True)
        self.layout = Layout(self.cfg, self.values_schema, self.name_fields)
        for outcome in ("published", "rejected"):  # dashboards show 0 before the first one, not "no data"
            metrics.ROWS.labels(self.drop, outcome)
        for outcome in ("done", "rejected", "failed"):
            metrics.FILES.labels(self.drop, outcome)
        self._stable: dict[str, tuple[str, float]] = {}
        self._retry_at: dict[str, float] = {}
        self._running = False

    @property
    def ledger(self) -> Ledger:
        return self.shared.ledger

    def start(self):
        self._running = True
        self._wakeup = FolderWakeup(self.folder)
        self._thread = self.container.spawn_managed_thread(self._watch, identifier=f"file_drop:{self.drop}")

    def stop(self):
        self._running = False
        self._thread.wait()
        self._wakeup.close()

    def kill(self):
        self._running = False
        self._thread.kill()
        self._wakeup.close()

    # -- watching ---------------------------------------------------------------

    def _watch(self):
        while self._running:
            try:
                for name in self.complete_files():
                    if not self._running:
                        return
                    self.take(name)
            except Exception:  # one bad poll must not end the watcher
                log.exception("file drop %s: poll failed", self.drop)
            self._wakeup.wait(self.cfg.poll_seconds)  # a change in the folder ends it early

    def complete_files(self) -> list[str]:
        """Names in the folder whose completion rule holds, oldest first; refuses the rest."""
        c = self.cfg.completion
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not fnmatch.fnmatch(name, self.cfg.pattern) \
                        or name.endswith((c.marker_suffix, c.temp_suffix)):
                    continue
                st = entry.stat(follow_symlinks=False)
                if not entry.is_file(follow_symlinks=False):  # symlinks, fifos, folders
                    self._refuse(name, identity(st), f"{name} is not a regular file"
                                 + (" (symlink)" if entry.is_symlink() else ""))
                    continue
                if self.ledger.seen(self.drop, name, identity(st)) \
                        or self._retry_at.get(name, 0) > time.monotonic():
                    continue
                if self._is_complete(name, st):
                    found.append((st.st_mtime_ns, name))
        return [name for _, name in sorted(found)]

    def _is_complete(self, name: str, st) -> bool:
        c = self.cfg.completion
        if c.rule == "marker":
            return (self.folder / (name + c.marker_suffix)).is_file()
        if c.rule == "rename":
            return True
        ident, now = identity(st), time.monotonic()
        seen = self._stable.get(name)
        if seen is None or seen[0] != ident:
            self._stable[name] = (ident, now)
            return False
        return now - seen[1] >= c.stable_seconds

    def _refuse(self, name: str, ident: str, reason: str, outcome: str = "refused"):
        if self.ledger.seen(self.drop, name, ident):
            return
        log.warning("file drop %s: refused %s", self.drop, reason, extra={"outcome": outcome})
        metrics.FILES.labels(self.drop, outcome).inc()
        self.ledger.remember(self.drop, name, ident, outcome)

    # -- taking a file ----------------------------------------------------------

    def take(self, name: str):
        """Validate, de-duplicate, publish and archive one complete file."""
        self._stable.pop(name, None)
        try:
            f, st = open_regular(self.folder, name)
        except RefusedFileError as exc:
            return self._refuse(name, identity(os.lstat(self.folder / name)), str(exc))
        except OSError as exc:
            st = os.lstat(self.folder / name)
            log.error("file drop %s: cannot read %s: %s", self.drop, name, exc.strerror)
            return self._refuse(name, identity(st), f"{name} cannot be read: {exc.strerror}", "unreadable")
        with f:  # both passes read this descriptor: the file pass 1 hashed, whatever the name holds later
            self._take(name, f, st)

    def _take(self, name: str, f, st):
        rejects = self.work / f"{name}.rejects.csv"
        validate = self.layout.needs_validation_first
        try:
            with _RejectReport(rejects) as report:
                outcome = self.layout.scan(f, None, report.add if validate else None, validate=validate)
        except FileProblemError as exc:
            return self._reject(name, st, None, str(exc), rejects)
        metrics.BYTES.labels(self.drop).inc(outcome.bytes)
        before = self.ledger.file(self.drop, outcome.sha256)
        if before and before["STATE"] == "done":
            log.info("file drop %s: %s has the content of %s (sha256 %s), done before: no events",
                     self.drop, name, before["NAME"], outcome.sha256, extra={"outcome": "duplicate"})
            metrics.FILES.labels(self.drop, "duplicate").inc()
            rejects.unlink(missing_ok=True)
            return self._archive(name, st)
        if outcome.problems:
            return self._reject(name, st, outcome, "; ".join(outcome.problems), rejects)
        if outcome.bad_rows and self.cfg.on_bad_rows == "reject_file":
            return self._reject(name, st, outcome, f"{outcome.bad_rows} bad rows", rejects)
        record = self.ledger.begin(self.drop, outcome.sha256, name, outcome.records, outcome.bad_rows)
        try:
            final = self._publish(name, f, outcome, record["ROWS_DONE"], rejects)
        except (ChunkFailedError, OSError, FileProblemError) as exc:
            return self._failed(name, st, outcome, record["ATTEMPTS"], str(exc))
        if final.bad_rows:
            move_unique(rejects, self.error)
            metrics.ROWS.labels(self.drop, "skipped").inc(final.bad_rows)
        else:
            rejects.unlink(missing_ok=True)
        self.ledger.finish(self.drop, outcome.sha256, name, "done", rows=final.rows, bad_rows=final.bad_rows)
        metrics.ROWS.labels(self.drop, "published").inc(final.rows)
        metrics.FILES.labels(self.drop, "done").inc()
        metrics.LAG.labels(self.drop).set(max(0.0, time.time() - st.st_mtime))
        log.info("file drop %s: %s done, %d rows, %d skipped", self.drop, name, final.rows,
                 final.bad_rows, extra={"id": outcome.sha256, "outcome": "done"})
        self._archive(name, st)

    def _publish(self, name: str, f, first: Outcome, rows_done: int, rejects: Path):
        """Pass 2 over `f`, checked against pass 1's Outcome `first`: validated rows after
        row `rows_done` to the service method in chunks, `inflight_chunks` at a time,
        checkpointed in order; bad rows to the reject report. Returns the pass's Outcome.
        A plain file (pass 1 found its `line_end`) is read on blocks (layout.py)."""
        sha256 = first.sha256
        inflight: deque[tuple[int, int, Event]] = deque()  # (chunk index, its last row, done)
        index = settled = 0
        window = self.cfg.inflight_chunks

        def settle_oldest():
            nonlocal settled
            chunk_index, last_row, done = inflight.popleft()
            error = done.wait()
            if error is not None:
                raise ChunkFailedError(f"chunk {chunk_index} (rows up to {last_row}) failed: {error}")
            settled += 1
            if settled % window == 0:  # a ledger transaction per window: a restart
                self.ledger.checkpoint(self.drop, sha256, last_row)  # sends two windows again at most

        def submit(rows, doubtful):
            nonlocal index
            if rows.numbers[-1] <= rows_done:
                return  # confirmed before a restart
            if rows.numbers[0] <= rows_done:
                rows.cut(bisect_right(rows.numbers, rows_done))  # the head was confirmed before
                doubtful = [n for n in doubtful if n > rows_done]
            chunk = RowChunk(self.drop, name, sha256, index, rows, doubtful)
            index += 1
            while len(inflight) >= window:
                settle_oldest()
            done = Event()
            self.container.spawn_worker(self, (chunk,), {}, context_data={"correlation_id": sha256},
                                        handle_result=_settles(done))
            inflight.append((chunk.index, rows.numbers[-1], done))
            # The worker runs now, not once the window is full: the chunk becomes its message
            # (and its rows are freed) while fresh, and the broker gets chunks steadily, not
            # in bursts of a window (1M rows: ~-4 MiB peak RSS, ~-20 % wall time).
            eventlet.sleep(0)

        f.seek(0)
        with _RejectReport(rejects) as report:
            again = self.layout.scan(f, submit, report.add, batch=self.cfg.chunk_rows, line_end=first.line_end,
                                     key_prefix=f"{sha256}:", expect=first)
        while inflight:
            settle_oldest()
        return again

    # -- endings ----------------------------------------------------------------

    def _archive(self, name: str, st):
        self._move(name, st, archive_folder(self.folder))

    def _move(self, name: str, st, folder: Path):
        try:
            now = os.lstat(self.folder / name)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            log.warning("file drop %s: %s was replaced or removed while it was read; a new file "
                        "there is taken on its own", self.drop, name, extra={"outcome": "replaced"})
            return
        try:
            move_unique(self.folder / name, folder)
            marker = self.folder / (name + self.cfg.completion.marker_suffix)
            marker.unlink(missing_ok=True)
        except OSError as exc:
            log.error("file drop %s: cannot move %s to %s: %s; it will not be read again",
                      self.drop, name, folder, exc, extra={"outcome": "unmovable"})
            metrics.FILES.labels(self.drop, "unmovable").inc()
            self.ledger.remember(self.drop, name, identity(st), "unmovable")

    def _reject(self, name: str, st, outcome, reason: str, rejects: Path):
        sha = outcome.sha256 if outcome else f"unreadable:{identity(st)}"
        self.ledger.finish(self.drop, sha, name, "rejected", reason,
                           outcome.records if outcome else 0, outcome.bad_rows if outcome else 0)
        if outcome and outcome.bad_rows:
            move_unique(rejects, self.error)
        else:
            with open(rejects, "a", newline="", encoding="utf-8") as report:
                csv.writer(report).writerow(["", "<file>", "", reason])
            move_unique(rejects, self.error)
        if outcome:
            metrics.ROWS.labels(self.drop, "rejected").inc(outcome.records)
        metrics.FILES.labels(self.drop, "rejected").inc()
        log.warning("file drop %s: rejected %s: %s", self.drop, name, reason, extra={"outcome": "rejected"})
        self._move(name, st, self.error)

    def _failed(self, name: str, st, outcome, attempts: int, reason: str):
        if attempts < self.cfg.max_attempts:
            delay = 2.0 ** attempts
            log.warning("file drop %s: %s failed (%s); attempt %d again in %.0fs",
                        self.drop, name, reason, attempts + 1, delay, extra={"outcome": "retry"})
            self._retry_at[name] = time.monotonic() + delay
            return
        self.ledger.finish(self.drop, outcome.sha256, name, "failed", reason)
        metrics.FILES.labels(self.drop, "failed").inc()
        log.error("file drop %s: %s failed %d times (%s); moved to error/", self.drop, name,
                  attempts, reason, extra={"outcome": "failed"})
        self._move(name, st, self.error)


def _settles(done: Event):
    """A worker's handle_result: wakes the reader with the worker's error (None when it
    succeeded) and lets go of the chunk. nameko's worker context sits in a reference
    cycle (the service instance holds the dependencies, which hold the context), so
    without this a chunk's rows would live until the next full garbage collection:
    tens of MiB of them at 100k rows/s."""
    def handle_result(worker_ctx, result, exc_info):
        worker_ctx.args = ()
        done.send(exc_info[1] if exc_info else None)
        return result, exc_info
    return handle_result


class _RejectReport:
    """The `.rejects.csv` of a file: row, column, value, reason."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["row", "column", "value", "reason"])
        return self

    def add(self, n: int, problems):
        self._writer.writerows((n, column, value, reason) for column, value, reason in problems)

    def __exit__(self, *exc):
        self._file.close()


file_drop = FileDrop.decorator
