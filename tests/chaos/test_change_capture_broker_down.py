"""The broker goes down under the erp's change capture (a real erp under `nameko run`,
a broker node this test owns, a real SQLite legacy database): the failing is logged
once, not as an ERROR traceback per attempt, the attempts back off, and the change
made meanwhile is published once the broker is back."""
from __future__ import annotations

import urllib.request
from datetime import datetime, timezone

import amqp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from bus import topology
from bus.publisher import connection_params
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from tests.conftest import free_port, start_broker
from tests.integration.support import nameko_run, stop, wait_for, write_config

pytestmark = pytest.mark.chaos

TAP = "test-cdc-broker-down"
ON_HAND = 4242  # what the legacy program writes while the broker is down


def channel_call(uri: str, fn):
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        return fn(conn.channel())
    finally:
        conn.collect()


def tap_bodies(uri: str) -> list[bytes]:
    def drain(channel):
        bodies = []
        while (message := channel.basic_get(TAP, no_ack=True)) is not None:
            bodies.append(message.body)
        return bodies
    return channel_call(uri, drain)


def failed_rows(port: int) -> float:
    """retailbus_cdc_rows_total{table="STK_LVL", kind="new", outcome="failed"} of the erp."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        families = text_string_to_metric_families(answer.read().decode())
    return sum(s.value for f in families for s in f.samples if s.name == "retailbus_cdc_rows_total"
               and s.labels == {"table": "STK_LVL", "kind": "new", "outcome": "failed"})


@pytest.mark.timeout(300)
def test_broker_down_change_capture_logs_once_backs_off_and_catches_up(tmp_path):
    broker = start_broker(tmp_path / "broker")
    try:
        uri = broker.uri()
        dsn = f"sqlite:///{tmp_path / 'legacy_erp.db'}"
        engine = engine_for(dsn)
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)

        def tap(channel):
            topology.declare_exchange(channel, "erp.events")
            channel.queue_declare(TAP, durable=True, auto_delete=False)
            channel.queue_bind(TAP, "erp.events", "erp.stock_changes.v1")
        channel_call(uri, tap)
        port = free_port()
        config = write_config(tmp_path, uri, legacy_db=dsn,
                              services={"erp": {"module": "services.erp", "metrics_port": port}})
        log = tmp_path / "erp.log"
        erp = nameko_run(config, "services.erp", log)
        try:
            # the seeded stock rows are captured and published: capture runs, the broker is there
            assert wait_for(lambda: tap_bodies(uri), timeout=120), log.read_text()[-3000:]
            broker.stop()
            with engine.begin() as conn:
                conn.execute(text('UPDATE "STK_LVL" SET "ON_HAND" = :n, "UPD_TS" = :ts '
                                  'WHERE "STORE_NO" = \'S001\' AND "SKU" = \'100001\''),
                             {"n": ON_HAND, "ts": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")})
            assert wait_for(lambda: failed_rows(port) >= 4, timeout=120), log.read_text()[-3000:]
            lines = log.read_text().splitlines()
            tracebacks = [line for line in lines if "error handling worker" in line and "on_stock_changes" in line]
            failing = [line for line in lines if "change capture on STK_LVL is failing" in line]
            assert len(tracebacks) <= 1, f"{len(tracebacks)} ERROR tracebacks, {failed_rows(port):.0f} attempts"
            assert len(failing) == 1, failing

            broker.start()
            assert wait_for(lambda: any(f'"on_hand":{ON_HAND}'.encode() in body for body in tap_bodies(uri)),
                            timeout=120), log.read_text()[-3000:]
            assert wait_for(lambda: "change capture on STK_LVL works again" in log.read_text(), timeout=60)
        finally:
            stop(erp)
            engine.dispose()
    finally:
        broker.stop()
