"""Shadow mode's bus half: compare, off the till's path, what the bus would have
done with what the legacy call did, and keep every mismatch.

Comparisons queue in memory (bounded: a burst never slows the till, an
overflow is counted as a shadow error) and one greenthread sends them to
`erp.shadow_compare` / `erp.stock_level` over one long-lived RPC proxy, a
few calls in flight at a time. Mismatches are appended to a bounded JSONL
file beside the outbox, with both sides and the differing fields, and read
back by `retailbus routes mismatches ROUTE` through the agent's HTTP API.
Each comparison of a sale or return is journaled (`shadow_compared`: parity,
mismatch or error) under the call's id, so `retailbus trace` shows it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import eventlet
from eventlet.queue import Empty, Full, LightQueue
from nameko.extensions import DependencyProvider
from nameko.standalone.rpc import ClusterRpcProxy

from bus import journal
from routing.route_state import RouteStats

log = logging.getLogger(__name__)

PENDING_MAX = 10000   # comparisons waiting; beyond this they are dropped and counted
IN_FLIGHT = 16        # RPC calls outstanding at once
RPC_TIMEOUT = 10.0    # default seconds per comparison (config: SHADOW_RPC_TIMEOUT)


class MismatchLog:
    """The last `keep` mismatches of one store, oldest first, in a JSONL file."""

    def __init__(self, path: Path, keep: int = 1000):
        self.path, self.keep = path, keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lines = sum(1 for _ in path.open()) if path.exists() else 0

    def add(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self._lines += 1
        if self._lines > 2 * self.keep:
            kept = self.path.read_text().splitlines()[-self.keep:]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("\n".join(kept) + "\n")
            os.replace(tmp, self.path)
            self._lines = len(kept)

    def read(self, route: str | None = None, limit: int = 100) -> list[dict]:
        if not self.path.exists():
            return []
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in records if route is None or r["route"] == route][-limit:]


class ShadowComparer(DependencyProvider):
    """The agent's comparison queue, its RPC worker and its mismatch log."""

    def setup(self):
        from routing.store_agent import configured_store  # the agent module owns store resolution

        store, settings, self.uri = configured_store(self.container)
        self.store_id = store.id
        self.mismatches = MismatchLog(settings.outbox_path(store).parent / "mismatches.jsonl")
        self.pending: LightQueue = LightQueue(PENDING_MAX)
        self.timeout = float(self.container.config.get("SHADOW_RPC_TIMEOUT", RPC_TIMEOUT))
        self._running = False

    def start(self):
        self._running = True
        self.container.spawn_managed_thread(self._run, identifier="shadow_comparer")

    def stop(self):
        self._running = False

    kill = stop

    def get_dependency(self, worker_ctx):
        return self

    def submit_posting(self, stats: RouteStats, route: str, message_type: str, parse,
                       request_body: bytes, legacy_body: bytes, trace: str | None = None) -> None:
        """Queue the comparison of one posting; `trace` is the call's journal id."""
        try:
            legacy = json.loads(legacy_body)
            doc_no = legacy["DOC_NO"]
            txn = parse(json.loads(request_body))
        except Exception as exc:  # the legacy ERP took what our contract refuses: a mismatch
            self._record(stats, route, "contract", [{"field": "contract", "bus": str(exc), "legacy": "accepted"}],
                         None, legacy_body.decode(errors="replace"), trace)
            return
        data = txn.model_dump(mode="json")
        self._submit(stats, route, txn.pos_txn_id, ("shadow_compare", (message_type, data, doc_no)),
                     lambda diffs: diffs, data, legacy, trace)

    def submit_stock(self, stats: RouteStats, route: str, store: str, sku: str, legacy_body: bytes) -> None:
        legacy = json.loads(legacy_body)

        def diffs(level):
            ours = level["on_hand"] if level else None
            return [] if ours == legacy.get("ON_HAND") else [
                {"field": "ON_HAND", "bus": ours, "legacy": legacy.get("ON_HAND")}]
        self._submit(stats, route, f"{store}/{sku}", ("stock_level", (store, sku)), diffs, None, legacy)

    def _submit(self, stats, route, ref, call, to_diffs, bus_input, legacy, trace=None):
        try:
            self.pending.put_nowait((stats, route, ref, call, to_diffs, bus_input, legacy, trace))
        except Full:
            self._error(stats, route, ref, trace, "shadow queue full")
            log.warning("shadow queue full; comparison of %s skipped", ref, extra={"id": ref, "correlationid": None})

    @staticmethod
    def _error(stats: RouteStats, route: str, ref: str, trace: str | None, why: str) -> None:
        stats.count(route, "shadow", "error")
        if trace is not None:
            journal.record("shadow_compared", "error", id=trace, correlationid=trace, subject=ref,
                           detail={"route": route, "error": why[:200]})

    def _record(self, stats: RouteStats, route: str, ref: str, diffs: list[dict], bus, legacy,
                trace: str | None = None) -> None:
        stats.shadowed(route, not diffs)
        if trace is not None:
            journal.record("shadow_compared", "mismatch" if diffs else "parity", id=trace, correlationid=trace,
                           subject=ref, detail={"route": route, **({"fields": ", ".join(
                               d["field"] for d in diffs)[:200]} if diffs else {})})
        if diffs:
            self.mismatches.add({"time": datetime.now(timezone.utc).isoformat(), "route": route, "ref": ref,
                                 "fields": [d["field"] for d in diffs], "diffs": diffs,
                                 "bus": bus, "legacy": legacy})
            log.warning("shadow mismatch on %s %s: %s", route, ref, ", ".join(d["field"] for d in diffs),
                        extra={"id": ref, "correlationid": None})

    def _batch(self) -> list:
        try:
            batch = [self.pending.get(timeout=0.5)]
        except Empty:
            return []
        while len(batch) < IN_FLIGHT:
            try:
                batch.append(self.pending.get_nowait())
            except Empty:
                break
        return batch

    def _run(self):
        cluster, proxy, backoff = None, None, 0.5
        while self._running:
            batch = self._batch()
            if not batch:
                continue
            try:
                if proxy is None:
                    with eventlet.Timeout(self.timeout):
                        cluster = ClusterRpcProxy({"AMQP_URI": self.uri}, timeout=self.timeout)
                        proxy = cluster.start()
                replies = [getattr(proxy.erp, method).call_async(*args) for _, _, _, (method, args), *_ in batch]
            except Exception as exc:  # bus down: every comparison of the batch is a shadow error
                for stats, route, ref, *_, trace in batch:
                    self._error(stats, route, ref, trace, f"bus unavailable: {exc}")
                log.warning("shadow comparisons failed (%s); %d counted as errors", exc, len(batch))
                cluster, proxy = self._close(cluster), None
                eventlet.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            deadline = time.monotonic() + self.timeout
            for (stats, route, ref, _, to_diffs, bus_input, legacy, trace), reply in zip(batch, replies):
                if proxy is None:  # an earlier reply of this batch timed out: so will these
                    self._error(stats, route, ref, trace, "an earlier comparison timed out")
                    continue
                try:
                    with eventlet.Timeout(max(0.1, deadline - time.monotonic())):
                        result = reply.result()
                    self._record(stats, route, ref, to_diffs(result), bus_input, legacy, trace)
                except BaseException as exc:  # eventlet.Timeout is a BaseException
                    if isinstance(exc, (KeyboardInterrupt, SystemExit, eventlet.greenlet.GreenletExit)):
                        raise
                    self._error(stats, route, ref, trace, f"{type(exc).__name__}: {exc}")
                    log.warning("shadow comparison of %s failed: %s", ref, exc or type(exc).__name__,
                                extra={"id": ref, "correlationid": None})
                    if isinstance(exc, eventlet.Timeout):
                        cluster, proxy = self._close(cluster), None
        self._close(cluster)

    @staticmethod
    def _close(cluster):
        if cluster is not None:
            try:
                with eventlet.Timeout(2):
                    cluster.stop()
            except BaseException:  # a dead connection may not close cleanly; it is dropped anyway
                pass
        return None
