"""`retailbus up` end to end, as the README runs it: a managed broker, the demo
legacy ERP, the erp service and a store agent; a POS sale over HTTP reaches
the legacy ERP database, exactly once (how fast: bench/)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bus import topology
from services.broker.node import ManagedBroker
from tests.conftest import free_ports
from tests.integration.support import legacy_sale, nothing_in_flight, wait_for, write_config

pytestmark = pytest.mark.integration

SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=5).read())


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def headers_for(db: Path, txn_id: str) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT DOC_NO, CHANNEL FROM SLS_HDR WHERE POS_TXN_ID = ?",
                                (txn_id,)).fetchall()
        except sqlite3.OperationalError:
            return []


@pytest.mark.timeout(300)
def test_up_brings_the_bus_up_and_a_sale_reaches_the_legacy_erp(tmp_path):
    mq, dist, mgmt, agent_port, erp_port = free_ports(5)
    config = write_config(
        tmp_path,
        broker={"home": "var/broker", "port": mq, "dist_port": dist, "management_port": mgmt},
        retry={"delays": [0.5, 1]},
        per_message_logs=True,  # the agent's "accepted" line, checked below
        services={"erp": {"module": "services.erp"}},
        stores=[{"id": "S001", "http": f"127.0.0.1:{agent_port}"}],
        agent={"auth_required": False},  # the till here is curl-like: unsigned
        legacy_erp={"http": f"127.0.0.1:{erp_port}"},
    )
    env = {k: v for k, v in os.environ.items() if k != "RETAILBUS_AMQP_URI"}
    retailbus = Path(sys.executable).with_name("retailbus")
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([str(retailbus), "up", "--config", str(config)], env=env, cwd=tmp_path,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    broker = ManagedBroker(tmp_path / "var" / "broker", port=mq, dist_port=dist, management_port=mgmt)
    agent = f"http://127.0.0.1:{agent_port}"
    try:
        assert wait_for(lambda: healthy(f"{agent}/healthz") or up.poll() is not None, timeout=180)
        assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        assert "guest" not in broker.users()
        assert json.loads((tmp_path / "var" / "prometheus_targets.json").read_text()) == [
            {"targets": [f"127.0.0.1:{agent_port}"], "labels": {"service": "store_agent"}}]  # erp: no metrics port here

        sale = legacy_sale("UP-0001")
        sent = time.monotonic()
        first = post(f"{agent}/erp/sales", sale)
        assert first["STATUS"] == "OK"
        db = tmp_path / "var" / "legacy_erp.db"
        assert wait_for(lambda: headers_for(db, "UP-0001"), timeout=120), "never reached the ERP"
        print(f"\nin the ERP {time.monotonic() - sent:.2f} s after the POS call")

        again = post(f"{agent}/erp/sales", sale)  # the POS retries the same transaction
        assert again["REF"] == first["REF"] and again["DUPLICATE"] is True
        assert wait_for(lambda: nothing_in_flight(broker, SALES_QUEUE, [health(f"{agent}/healthz")["outbox_depth"]]),
                        timeout=120, interval=1)  # a second copy would be in the ERP by now
        assert headers_for(db, "UP-0001") == [("S00000001", "RBUS")]
        broker_pid = broker.pid()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=120)
        log.close()
        if broker.is_running():  # up failed to stop what it started: clean up, then fail below
            broker.stop()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output[-3000:]
    assert "stopped cleanly" in output
    assert not Path(f"/proc/{broker_pid}").exists(), "up must stop the broker it started"
    json_lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    accepted = [line for line in json_lines if line.get("message", "").startswith("accepted pos.sale.v1")]
    assert accepted and accepted[0]["id"] == first["REF"] and accepted[0]["correlationid"]
