"""The business exception workbench for real: the cases service as its own process on the
real broker, over SQLite and over PostgreSQL, worked with the real `retailbus cases` CLI.

An opening delivered twice, or sent again by another service, is one case; the list
filters by type, store and deadline; assign and resolve go through the service and leave
history lines with the OS user; retry publishes process.step_retry.v1 into a queue the
test binds; a case past its SLA is listed overdue, counted by the gauge and fires the alert
rule in a real Prometheus; and an offline over-redemption at the loyalty service (with the
demo loyalty platform) becomes a case on its own.
"""
from __future__ import annotations

import getpass
import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import amqp
import pytest
from nameko.standalone.rpc import ClusterRpcProxy
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connection_params
from contracts.cases import CaseOpenedV1, ProcessStepRetryV1
from contracts.envelope import CloudEvent
from tests.conftest import free_port
from tests.integration.support import Platform, nameko_run, purge_queues, queue_state, stop, wait_for, write_config
from tests.integration.test_dashboards import http_json, start_prometheus

pytestmark = pytest.mark.integration

RULES = """default_sla: 24h
types:
  loyalty_over_redemption: {sla: 2d}
  return_over_quantity: {sla: 2d}
  quick_check: {sla: 10s}
"""
SENDERS = ("loyalty", "returns", "orders", "customers")
QUEUES = [topology.handler_queue(source, CaseOpenedV1.TYPE, "cases", f"on_{source}_case") for source in SENDERS]
NOW = datetime.now(timezone.utc)
RPC_TIMEOUT = 8  # seconds the CLI waits for the service (an answer takes well under one)


def opening(case_id: str, case_type: str, store: str, key: str | None = None, **fields) -> CloudEvent:
    case = CaseOpenedV1(case_id=case_id, case_type=case_type, store_id=store, summary=f"test case {case_id}",
                        opened_at=fields.pop("opened_at", datetime.now(timezone.utc)), **fields)
    return CloudEvent.new(CaseOpenedV1.TYPE, "tests/cases", case, subject=case_id, idempotencykey=key or case_id)


class Workbench:
    """The cases service (its own process) and the CLI, on one database."""

    def __init__(self, root: Path, uri: str, dsn: str, kind: str):
        self.root, self.uri, self.kind = root, uri, kind
        (root / "var").mkdir(parents=True, exist_ok=True)
        rules = root / "config" / "cases.yaml"
        rules.parent.mkdir(parents=True, exist_ok=True)
        rules.write_text(RULES)
        self.metrics_port = free_port()
        self.config = write_config(root, uri, cases={"dsn": dsn, "rules": str(rules), "interval": 0.5,
                                                     "rpc_timeout": RPC_TIMEOUT},
                                   services={"cases": {"module": "services.cases", "metrics_port": self.metrics_port}},
                                   handlers={f"cases.on_{s}_case": {"attempts": 5, "delays": [0.5, 1]}
                                             for s in SENDERS})
        for queue in QUEUES:  # openings other tests of the session left (loyalty's) are not ours
            purge(uri, queue)
        self.start()
        self.publisher = ConfirmingPublisher(uri, window=100)

    def start(self) -> None:
        self.process = nameko_run(self.config, "services.cases", self.root / "cases.log")
        assert wait_for(lambda: all(queue_state(self.uri, q)[1] for q in [*QUEUES, "rpc-cases"]), 120), self.log()

    def log(self) -> str:
        return (self.root / "cases.log").read_text()[-4000:]

    def publish(self, events: list[CloudEvent], exchange: str = "loyalty.events") -> None:
        assert self.publisher.publish_many([event_message(e, exchange) for e in events]) == [None] * len(events)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", "cases", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120, cwd=self.root)

    def list(self, *args: str) -> list[str]:
        done = self.cli("list", "--json", *args)
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["case_id"] for line in done.stdout.splitlines()]

    def show(self, case_id: str) -> dict | None:
        done = self.cli("show", case_id, "--json")
        return json.loads(done.stdout) if done.returncode == 0 else None

    def metric(self, name: str, **labels) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
                body = answer.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def close(self) -> None:
        self.publisher.close()
        assert stop(self.process) == 0, self.log()


def purge(uri: str, queue: str) -> None:
    purge_queues(uri, [queue])


def postgres_database(base: str) -> str:
    name = f"cases_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))  # our own generated name
    finally:
        engine.dispose()
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bench(request, amqp_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cases-{request.param}")
    dsn = f"sqlite:///{root / 'var' / 'cases.db'}" if request.param == "sqlite" else \
        postgres_database(request.getfixturevalue("postgres"))
    workbench = Workbench(root, amqp_uri, dsn, request.param)
    try:
        yield workbench
    finally:
        workbench.close()


@pytest.mark.timeout(180)
def test_an_opening_delivered_twice_or_sent_by_another_service_is_one_case(bench):
    queue = QUEUES[1]
    duplicates = bench.metric("retailbus_messages_consumed_total", queue=queue, outcome="duplicate") or 0
    event = opening("return_over_quantity:T1-R-1", "return_over_quantity", "T1",
                    process="return_to_refund", process_id="P-T1-1", transaction_id="T1-R-1")
    again = opening("return_over_quantity:T1-R-1", "return_over_quantity", "T1", key="another sender's key",
                    process="return_to_refund", process_id="P-T1-1", transaction_id="T1-R-1")
    bench.publish([event, event, again], exchange="returns.events")  # redelivered, and sent again
    assert wait_for(lambda: bench.metric("retailbus_messages_consumed_total", queue=queue,
                                         outcome="duplicate") == duplicates + 2, 60), bench.log()
    case = bench.show("return_over_quantity:T1-R-1")
    assert (case["state"], case["store_id"], case["process_id"], case["opened_by"]) == \
        ("open", "T1", "P-T1-1", "tests/cases")
    assert [h["action"] for h in case["history"]] == ["opened"]
    assert bench.list("--store", "T1") == ["return_over_quantity:T1-R-1"]


@pytest.mark.timeout(180)
def test_the_list_filters_by_type_store_and_deadline(bench):
    bench.publish([
        opening("loyalty_over_redemption:T2A:1", "loyalty_over_redemption", "T2A"),
        opening("return_over_quantity:T2A:2", "return_over_quantity", "T2A", opened_at=NOW - timedelta(days=3)),
        opening("return_over_quantity:T2B:3", "return_over_quantity", "T2B"),
    ])
    assert wait_for(lambda: len(bench.list("--store", "T2A")) + len(bench.list("--store", "T2B")) == 3, 60)
    assert bench.list("--store", "T2A") == ["return_over_quantity:T2A:2", "loyalty_over_redemption:T2A:1"]
    assert bench.list("--store", "T2A", "--type", "loyalty_over_redemption") == ["loyalty_over_redemption:T2A:1"]
    assert bench.list("--store", "T2A", "--overdue") == ["return_over_quantity:T2A:2"]  # opened 3 days ago, SLA 2d
    assert bench.list("--type", "return_over_quantity", "--store", "T2B") == ["return_over_quantity:T2B:3"]
    text_list = bench.cli("list", "--store", "T2A")
    assert "OVERDUE by" in text_list.stdout and "2 case(s)" in text_list.stdout


@pytest.mark.timeout(180)
def test_assign_and_resolve_go_through_the_service_and_are_audited_with_the_os_user(bench):
    bench.publish([opening("loyalty_over_redemption:T3:1", "loyalty_over_redemption", "T3")])
    assert wait_for(lambda: bench.show("loyalty_over_redemption:T3:1"), 60)
    me = getpass.getuser()
    assigned = bench.cli("assign", "loyalty_over_redemption:T3:1", "--to", "ana")
    assert assigned.returncode == 0 and "assigned to ana" in assigned.stdout, assigned.stderr
    resolved = bench.cli("resolve", "loyalty_over_redemption:T3:1", "--reason", "goodwill: card topped up")
    assert resolved.returncode == 0, resolved.stderr
    case = bench.show("loyalty_over_redemption:T3:1")
    assert (case["state"], case["owner"], case["resolution"]) == ("resolved", "ana", "goodwill: card topped up")
    assert [(h["action"], h["actor"], h["detail"]) for h in case["history"][1:]] == [
        ("assigned", me, "to ana"), ("resolved", me, "goodwill: card topped up")]

    again = bench.cli("resolve", "loyalty_over_redemption:T3:1", "--reason", "twice")
    assert again.returncode == 1 and "was resolved at" in again.stderr
    unknown = bench.cli("assign", "no-such-case", "--to", "ana")
    assert unknown.returncode == 1 and "no case no-such-case" in unknown.stderr
    assert bench.list("--store", "T3") == [] and bench.list("--store", "T3", "--state", "resolved") == \
        ["loyalty_over_redemption:T3:1"]
    assert len(bench.show("loyalty_over_redemption:T3:1")["history"]) == 3  # the refusals wrote nothing


@pytest.mark.timeout(240)
def test_a_change_asked_while_the_service_is_down_expires_and_is_never_applied_later(bench):
    bench.publish([opening("loyalty_over_redemption:T7:1", "loyalty_over_redemption", "T7")])
    assert wait_for(lambda: bench.show("loyalty_over_redemption:T7:1"), 60)
    assert stop(bench.process) == 0, bench.log()
    try:
        late = bench.cli("resolve", "loyalty_over_redemption:T7:1", "--reason", "asked while it was down")
        assert late.returncode == 1 and f"no answer from the cases service within {RPC_TIMEOUT}s" in late.stderr
    finally:
        bench.start()
    assert wait_for(lambda: queue_state(bench.uri, "rpc-cases")[0] == 0, 30)  # the request is gone, not handled
    assert bench.cli("assign", "loyalty_over_redemption:T7:1", "--to", "ana").returncode == 0  # served again
    case = bench.show("loyalty_over_redemption:T7:1")
    assert case["state"] == "assigned" and [h["action"] for h in case["history"]] == ["opened", "assigned"]


@pytest.mark.timeout(180)
def test_retry_publishes_the_step_retry_for_the_case_process_and_refuses_a_case_without_one(bench):
    queue = f"test-step-retry-{uuid.uuid4().hex[:8]}"
    conn = amqp.Connection(**connection_params(bench.uri, 5))
    conn.connect()
    try:
        channel = conn.channel()
        topology.declare_exchange(channel, topology.events_exchange("cases"))
        channel.queue_declare(queue, auto_delete=False, durable=False, exclusive=True)
        channel.queue_bind(queue, topology.events_exchange("cases"), ProcessStepRetryV1.TYPE)
        bench.publish([opening("loyalty_reversal_refused:T4-R-1", "loyalty_reversal_refused", "T4",
                               process="return_to_refund", process_id="P-T4-1"),
                       opening("loyalty_over_redemption:T4:2", "loyalty_over_redemption", "T4")],
                      exchange="returns.events")
        assert wait_for(lambda: len(bench.list("--store", "T4")) == 2, 60)

        refused = bench.cli("retry", "loyalty_over_redemption:T4:2")
        assert refused.returncode == 1 and "has no process instance to retry" in refused.stderr
        done = bench.cli("retry", "loyalty_reversal_refused:T4-R-1")
        assert done.returncode == 0, done.stderr
        message = wait_for(lambda: channel.basic_get(queue, no_ack=True), 30)
        assert message is not None and channel.basic_get(queue, no_ack=True) is None  # one command, only for that case
        event = CloudEvent.from_json(message.body)
        assert event.type == ProcessStepRetryV1.TYPE
        assert event.payload() == ProcessStepRetryV1(process="return_to_refund", process_id="P-T4-1",
                                                      case_id="loyalty_reversal_refused:T4-R-1",
                                                      requested_by=getpass.getuser())
        assert event.idempotencykey == "step_retry:loyalty_reversal_refused:T4-R-1:1"
        history = bench.show("loyalty_reversal_refused:T4-R-1")["history"]
        assert [(h["action"], h["actor"]) for h in history] == [("opened", "tests/cases"),
                                                                ("retried", getpass.getuser())]
        assert bench.show("loyalty_reversal_refused:T4-R-1")["state"] == "open"
    finally:
        conn.collect()


@pytest.mark.timeout(240)
def test_a_case_past_its_sla_is_overdue_counted_and_fires_the_alert_in_prometheus(bench):
    bench.publish([opening("quick_check:T5:1", "quick_check", "T5")])  # SLA 10 s
    assert wait_for(lambda: bench.list("--store", "T5") == ["quick_check:T5:1"], 60)
    case = bench.show("quick_check:T5:1")
    due = datetime.fromisoformat(case["due_at"])
    assert due - datetime.fromisoformat(case["opened_at"]) == timedelta(seconds=10)
    asked = datetime.now(timezone.utc)
    not_yet = bench.list("--store", "T5", "--overdue")
    if asked < due:  # on a slow machine the deadline may pass before the case is even listed
        assert not_yet == []
    assert wait_for(lambda: bench.list("--store", "T5", "--overdue") == ["quick_check:T5:1"], 30)
    assert wait_for(lambda: bench.metric("retailbus_cases_overdue", type="quick_check") == 1, 30)
    assert bench.metric("retailbus_cases_open", type="quick_check", age="0-1h") == 1

    prometheus, base = start_prometheus(bench.root, {"cases": f"127.0.0.1:{bench.metrics_port}"})
    try:
        def firing():  # (the overdue case of the list test fires for its own type too)
            alerts = http_json(f"{base}/api/v1/alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "RetailbusCaseOverdue"
                    and a["labels"]["type"] == "quick_check" and a["state"] == "firing"]
        found = wait_for(firing, 60, interval=0.5)
        assert found, http_json(f"{base}/api/v1/alerts")
        assert found[0]["annotations"]["summary"] == "1 quick_check case(s) past their SLA"
    finally:
        prometheus.send_signal(signal.SIGTERM)
        prometheus.wait(timeout=30)

    assert bench.cli("resolve", "quick_check:T5:1", "--reason", "checked").returncode == 0
    assert wait_for(lambda: bench.metric("retailbus_cases_overdue", type="quick_check") == 0, 30)


@pytest.mark.timeout(300)
def test_an_offline_over_redemption_at_the_loyalty_service_becomes_a_case(bench, tmp_path):
    platform = Platform("demo.loyalty_platform", tmp_path / "platform.db", free_port())
    (tmp_path / "var").mkdir()
    config = write_config(tmp_path, bench.uri, loyalty_platform={"http": platform.url.removeprefix("http://"),
                                                                 "db": "var/unused.db"})
    loyalty = nameko_run(config, "services.loyalty", tmp_path / "loyalty.log")
    try:
        assert wait_for(lambda: queue_state(bench.uri, "rpc-loyalty")[1] >= 1, 120), \
            (tmp_path / "loyalty.log").read_text()[-3000:]
        card = f"LC-{bench.kind[:2].upper()}6"
        assert platform.call("POST", "/members", {"card": card, "customer_id": f"CU-{card}"}, f"m-{card}")[0] == 201
        assert platform.call("POST", "/transactions", {"card": card, "type": "EARN", "points": 100,
                                                       "reference": "seed"}, f"seed-{card}")[0] == 201
        with ClusterRpcProxy({"AMQP_URI": bench.uri}, timeout=60) as rpc:  # as a store agent books it
            answer = rpc.loyalty.capture_offline(card, 300, "T6", "T6-07-1", f"OFF-{card}")
        assert answer["status"] == "over_redeemed"

        case_id = "loyalty_over_redemption:T6:T6-07-1"
        assert wait_for(lambda: bench.show(case_id), 90), (tmp_path / "loyalty.log").read_text()[-3000:]
        case = bench.show(case_id)
        assert (case["case_type"], case["state"], case["store_id"], case["transaction_id"], case["opened_by"]) == \
            ("loyalty_over_redemption", "open", "T6", "T6-07-1", "retailbus/loyalty")
        assert card in case["summary"] and "300 points" in case["summary"]

        exceptions = subprocess.run([sys.executable, "-m", "services.cli", "loyalty", "exceptions", "--config",
                                     str(config)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert "over_redemption" in exceptions.stdout and "retailbus cases list" in exceptions.stdout
    finally:
        stop(loyalty)
        platform.stop()
