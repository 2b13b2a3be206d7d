"""Logs an operator can afford: a hot path says what it did once a minute at INFO
(bus/logs.py MinuteSummary), each message only at DEBUG; a real outbox file and
the agent's own accept path, no broker."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import eventlet
import pytest
from nameko.testing.services import worker_factory
from werkzeug.test import EnvironBuilder

from bus.logs import MinuteSummary
from bus.settings import AgentSettings
from routing import store_agent
from routing.outbox import Outbox
from routing.route_state import RouteStats
from routing.route_table import parse_route_table
from tests.integration.support import legacy_sale, wait_for

pytestmark = pytest.mark.unit

BUS_TABLE = """version: 1
legacy: {base_url: "http://127.0.0.1:9"}
routes:
  - {name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: bus}
"""


def test_a_summary_says_the_minute_once_when_it_ends(caplog):
    log = logging.getLogger("test.summary")
    summary = MinuteSummary(log, "things done", every=0.05)
    with caplog.at_level(logging.INFO, logger="test.summary"):
        for n in range(500):
            summary.note("ok" if n % 10 else "duplicate")
        assert caplog.records == []  # nothing per event
        assert wait_for(lambda: caplog.records, timeout=30, interval=0.02)
        [line] = caplog.records
        assert line.getMessage() == "things done in the last 0.05s: duplicate 50, ok 450"
        assert line.outcome == "summary"
        summary.note("ok")
        assert wait_for(lambda: len(caplog.records) == 2, timeout=30, interval=0.02)


class Forwarder:
    def wake(self):
        pass


def test_the_agent_logs_no_info_line_per_sale(tmp_path, caplog):
    box = Outbox(tmp_path / "outbox.db")
    store = SimpleNamespace(store_id="S001", outbox=box, forwarder=Forwarder(), later=lambda fn, *a: fn(*a),
                            config=AgentSettings(auth_required=False), verifier=None,
                            answers=SimpleNamespace(once=lambda request, body, auth, handle: handle(None)))
    routes = SimpleNamespace(table=parse_route_table(BUS_TABLE), stats=RouteStats())
    agent = worker_factory(store_agent.StoreAgent, store=store, routes=routes)
    store_agent.ACCEPTED.flush()
    try:
        with caplog.at_level(logging.DEBUG, logger="routing.store_agent"):
            for n in range(30):
                body = json.dumps(legacy_sale(f"S001-LOG{n % 25}"))  # five till retries among them
                request = EnvironBuilder(method="POST", path="/erp/sales", data=body,
                                         content_type="application/json").get_request()
                assert agent.post_sale(request).status_code == 200
            assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
            assert len([r for r in caplog.records if r.getMessage().startswith("accepted")]) == 30  # DEBUG
            store_agent.ACCEPTED.flush()
            [line] = [r for r in caplog.records if r.levelno == logging.INFO]
            assert line.getMessage().endswith("pos.sale.v1 accepted 25, pos.sale.v1 duplicate 5")
    finally:
        box.close()
    eventlet.sleep(0)
