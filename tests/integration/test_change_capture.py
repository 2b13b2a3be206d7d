"""Change capture on STK_LVL with a legacy program writing it from another process,
and the erp service restarted twice meanwhile (a kill -9, then a clean stop), on
SQLite and PostgreSQL: every committed version reaches a subscriber at least
once (the writer rewrites rows only after their first versions were emitted: a
version overwritten before any poll is invisible to polling by design) and a
consumer keeping the newest version per key ends with the table."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import amqp
import pytest
from sqlalchemy import select

from demo.legacy_erp.schema import STK_LVL, create_schema, engine_for, utc_stamp
from bus import topology
from bus.publisher import connection_params
from tests.integration.stock_writer import keys
from tests.integration.support import nameko_run, stop, wait_for, write_config

pytestmark = pytest.mark.integration

UPDATES, REWRITES = 10_000, 1_000


class Subscriber:
    """A durable queue on erp.events for one event type, drained in the test process."""

    def __init__(self, uri: str, routing_key: str, queue: str):
        """`routing_key`: one or more binding keys, space-separated."""
        self.conn = amqp.Connection(**connection_params(uri, 5, heartbeat=0))
        self.conn.connect()
        self.channel = self.conn.channel()
        topology.declare_exchange(self.channel, "erp.events")
        self.channel.queue_declare(queue, durable=True, auto_delete=False)
        self.channel.queue_purge(queue)
        for key in routing_key.split():
            self.channel.queue_bind(queue, "erp.events", key)
        self.events: list[dict] = []
        self.channel.basic_qos(0, 1000, False)
        self.channel.basic_consume(queue, callback=self._on_message)

    def _on_message(self, message):
        event = json.loads(message.body)
        if event["type"] == "erp.stock_changes.v1":  # each item as the message it stands for
            self.events.extend({"idempotencykey": item["idempotencykey"], "data": item["change"]}
                               for item in event["data"]["items"])
        else:
            self.events.append(event)
        message.channel.basic_ack(message.delivery_tag)

    def drain(self, seconds: float = 0.2):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.conn.drain_events(timeout=0.05)
            except TimeoutError:
                pass

    def close(self):
        self.conn.collect()


def committed_versions(log) -> list[tuple]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def written(log) -> int:
    """Versions the writer has logged so far (whole lines only: it may be mid-line)."""
    return log.read_text().count("\n") if log.exists() else 0


@pytest.mark.timeout(480)
def test_every_stock_change_is_captured_across_restarts(amqp_uri, legacy_dsn, tmp_path):
    engine = engine_for(legacy_dsn)
    create_schema(engine)
    seeded = utc_stamp()
    with engine.begin() as conn:  # the rows the legacy program will update, before erp starts
        conn.execute(STK_LVL.insert(), [dict(STORE_NO=s, SKU=k, ON_HAND=0, UPD_TS=seeded)
                                        for s, k in keys(UPDATES)])
    sub = Subscriber(amqp_uri, "erp.stock_changes.v1", f"test.cdc.{tmp_path.name}")
    config = write_config(tmp_path, amqp_uri, legacy_db=legacy_dsn)
    erp_log, writes = tmp_path / "erp.log", tmp_path / "writes.jsonl"
    erp = nameko_run(config, "services.erp", erp_log)
    writer = None
    try:
        assert wait_for(lambda: (sub.drain(), len(sub.events) >= UPDATES)[1], timeout=60), \
            "the initial snapshot of STK_LVL was not captured"
        go = tmp_path / "go"  # the writer rewrites rows only once every first version was emitted
        writer = subprocess.Popen([sys.executable, "-m", "tests.integration.stock_writer",
                                   legacy_dsn, str(writes), str(UPDATES), str(REWRITES), str(go)],
                                  cwd=Path(__file__).parents[2], stderr=(tmp_path / "writer.err").open("wb"))
        for restart in ("kill", "term"):  # restarted twice midway through the writes
            sub.drain(2.0)
            assert written(writes) < UPDATES, "the first writes ended before the restarts"
            erp.kill() if restart == "kill" else stop(erp)
            erp.wait()
            erp = nameko_run(config, "services.erp", erp_log)

        def emitted_versions():
            sub.drain(0.5)
            return {(e["data"]["store_id"], e["data"]["sku"], e["data"]["on_hand"],
                     e["data"]["changed_at"][:26]) for e in sub.events}

        assert wait_for(lambda: written(writes) == UPDATES, timeout=120), \
            (tmp_path / "writer.err").read_text()[-2000:]
        first = set(committed_versions(writes))
        assert wait_for(lambda: first <= emitted_versions(), timeout=120), \
            f"{len(first - emitted_versions())} of the first {UPDATES} versions never emitted"
        go.touch()
        assert wait_for(lambda: (sub.drain(), writer.poll() is not None)[1], timeout=120)
        assert writer.returncode == 0, (tmp_path / "writer.err").read_text()[-2000:]
        versions = committed_versions(writes)
        assert len(versions) == UPDATES + REWRITES
        assert wait_for(lambda: set(versions) <= emitted_versions(), timeout=120), \
            f"{len(set(versions) - emitted_versions())} committed versions never emitted"
        emitted = emitted_versions()

        with engine.connect() as conn:
            c = STK_LVL.c
            final = {(s, k): (ts, n) for s, k, n, ts in conn.execute(
                select(c.STORE_NO, c.SKU, c.ON_HAND, c.UPD_TS))}
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        stop(erp)
        sub.close()
        engine.dispose()

    late = sum(1 for line in erp_log.read_text().splitlines() if "late" in line)  # informational

    # a consumer deduplicating by idempotencykey and keeping the newest version per key
    state, keys_seen = {}, set()
    for e in sub.events:
        if e["idempotencykey"] in keys_seen:
            continue
        keys_seen.add(e["idempotencykey"])
        d = e["data"]
        key = (d["store_id"], d["sku"])
        if key not in state or d["changed_at"] >= state[key][0]:
            state[key] = (d["changed_at"], d["on_hand"])
    assert {k: v[1] for k, v in state.items()} == {k: n for k, (ts, n) in final.items()}
    assert len(sub.events) >= len(emitted) >= len(versions)
    print(f"\n{legacy_dsn.split(':')[0]}: {len(versions)} writes, {len(sub.events)} events, "
          f"{len(emitted)} distinct versions, {len(sub.events) - len(keys_seen)} repeats, late lines {late}")
