"""The dead-letter workbench on a real broker with the real erp service and a real
legacy database: a poison sale is parked after the configured attempts, shown,
fixed with `retailbus dlq replay --edit` (the CLI as a subprocess, $EDITOR a
script) and posted once; purge, list filters and not_retried errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import amqp
import pytest
from sqlalchemy import text

from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing.legacy_payload import sale_from_legacy
from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, OutgoingMessage, connection_params
from services.dlq.workbench import AuditLog
from tests.integration.support import legacy_sale, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

EXCHANGE = topology.events_exchange("store_agent")
SALES = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")
# the erp's second queue: the return process's commands (a bus-routed pos.return.v1 goes to the returns service)
RETURNS = topology.handler_queue("erp", "erp.post_return.v1", "erp", "on_post_return")
SPY = "test-dlq-spy-sales"  # another consumer of the sales: a replay must not reach it
# A line number no legacy column can hold (SLS_LIN.LINE_NO; SQLite: OverflowError, PostgreSQL:
# integer out of range): the ERP fails on every attempt, the contract allows it.
POISON_LINE_NO = 2**63
FIX_LINE_NO = 1
HANDLER = {"attempts": 3, "delays": [0.2]}  # 3 attempts, 0.2 s apart


def broker_call(uri: str, fn):
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        return fn(conn.channel())
    finally:
        conn.collect()


def reset_queues(uri: str) -> None:
    """Sales/returns queues, their DLQs and this test's retry queues, empty."""
    for queue in (SALES, RETURNS):
        for name in [queue, topology.dead_letter_queue(queue)] + [topology.retry_queue(queue, d) for d in HANDLER["delays"]]:
            broker_call(uri, lambda ch: ch.queue_delete(name))
    broker_call(uri, lambda ch: ch.queue_delete(SPY))


@pytest.fixture
def queues(amqp_uri, request):
    """The broker cleaned of our queues, and a spy queue on the sales."""
    reset_queues(amqp_uri)
    request.addfinalizer(lambda: reset_queues(amqp_uri))

    def spy(ch):
        topology.declare_exchange(ch, EXCHANGE)
        ch.queue_declare(SPY, durable=True, auto_delete=False)
        ch.queue_bind(SPY, EXCHANGE, "pos.sale.v1")
    broker_call(amqp_uri, spy)


@pytest.fixture
def estate(queues, legacy_dsn, request):
    """A seeded legacy database (SQLite and PostgreSQL) and clean queues."""
    dsn = legacy_dsn
    engine = engine_for(dsn)
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    request.addfinalizer(engine.dispose)
    return dsn, engine


def start_erp(amqp_uri, dsn, tmp_path, handler: dict):
    config = write_config(tmp_path, amqp_uri, legacy_db=dsn, handlers={"erp.on_pos_sale": handler},
                          services={"erp": {"module": "services.erp"}, "dlq": {"module": "services.dlq"}})
    process = nameko_run(config, "services.erp", tmp_path / "erp.log")
    assert wait_for(lambda: all(queue_state(amqp_uri, q)[1] == 1 for q in (SALES, RETURNS)), timeout=90), \
        "erp did not start consuming"
    return config, process


def poison_sale(txn_id: str) -> CloudEvent:
    data = sale_from_legacy(legacy_sale(txn_id)).model_dump(mode="json")
    data["lines"][0]["line_no"] = POISON_LINE_NO
    return CloudEvent.new("pos.sale.v1", "store/S001/pos/07", data, subject=txn_id,
                          idempotencykey=f"pos.sale.v1:S001:{txn_id}")


def publish(uri: str, *messages: OutgoingMessage) -> None:
    publisher = ConfirmingPublisher(uri)
    try:
        assert publisher.publish_many(list(messages)) == [None] * len(messages)
    finally:
        publisher.close()


def cli(config: Path, *args: str, editor: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("VISUAL", None)
    if editor is not None:
        env["EDITOR"] = f"{sys.executable} {editor}"
    return subprocess.run([sys.executable, "-m", "services.cli", "dlq", *args, "--config", str(config)],
                          env=env, cwd=config.parent.parent, capture_output=True, text=True, timeout=120)


def editor_script(folder: Path, name: str, body: str) -> Path:
    """An $EDITOR: a script that rewrites the JSON file it is given."""
    path = folder / name
    path.write_text(textwrap.dedent("""\
        import json, sys
        path = sys.argv[1]
        with open(path) as f:
            event = json.load(f)
        data = event["data"]
        """) + textwrap.dedent(body) + textwrap.dedent("""\
        with open(path, "w") as f:
            json.dump(event, f, indent=2)
        """))
    return path


def postings(engine, txn_id: str) -> list:
    with engine.connect() as conn:
        return conn.execute(text('SELECT h."DOC_NO", l."LINE_NO" FROM "SLS_HDR" h JOIN "SLS_LIN" l '
                                 'ON l."DOC_NO" = h."DOC_NO" WHERE h."POS_TXN_ID" = :t'), {"t": txn_id}).all()


def show(config: Path, message_id: str) -> dict:
    result = cli(config, "show", message_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.timeout(300)
def test_poison_sale_parked_after_attempts_fixed_by_edit_and_posted_once(amqp_uri, estate, tmp_path):
    dsn, engine = estate
    config, erp = start_erp(amqp_uri, dsn, tmp_path, HANDLER)
    try:
        event = poison_sale("POISON-0001")
        publish(amqp_uri, event_message(event, EXCHANGE))
        dlq = topology.dead_letter_queue(SALES)
        assert wait_for(lambda: queue_state(amqp_uri, dlq)[0] == 1, timeout=60), "not dead-lettered"

        # parked after exactly the configured attempts, with the error
        shown = cli(config, "show", event.id)
        assert shown.returncode == 0, shown.stderr
        info = show(config, event.id)
        assert info["attempts"] == 3
        assert info["error_type"] and info["error"], info
        assert "attempts:         3\n" in shown.stdout
        error_line = next(line for line in shown.stdout.splitlines() if line.startswith("error:"))
        assert info["error_type"] in error_line and info["error"].splitlines()[0] in error_line
        assert ("too large" if "sqlite" in dsn else "out of range") in error_line
        assert info["original_route"] == {"exchange": EXCHANGE, "routing_key": "pos.sale.v1", "queue": SALES}
        assert f'"line_no": {POISON_LINE_NO}' in shown.stdout  # the body
        assert info["body"]["data"]["lines"][0]["line_no"] == POISON_LINE_NO
        assert postings(engine, "POISON-0001") == []

        # an edit that breaks the contract is refused with the field path; nothing moves
        breaking = editor_script(tmp_path, "break.py", 'data["total_minor"] += 1\n')
        refused = cli(config, "replay", event.id, "--edit", editor=breaking)
        assert refused.returncode == 1
        assert "data.total_minor" in refused.stderr
        assert queue_state(amqp_uri, dlq)[0] == 1

        # a plain replay fails again: parked after 3 fresh attempts (the count was reset)
        again = cli(config, "replay", event.id, "--reason", "retry after ERP restart")
        assert again.returncode == 0, again.stderr
        assert wait_for(lambda: queue_state(amqp_uri, dlq)[0] == 1 and show(config, event.id)["attempts"] == 3,
                        timeout=60)

        # the fix: the line number the legacy schema can hold
        fixing = editor_script(tmp_path, "fix.py", f'data["lines"][0]["line_no"] = {FIX_LINE_NO}\n')
        fixed = cli(config, "replay", event.id, "--edit", "--user", "alice",
                    "--reason", "till 07 sent a garbage line number", editor=fixing)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert f"replayed {event.id}" in fixed.stdout

        assert wait_for(lambda: postings(engine, "POISON-0001"), timeout=60)
        assert wait_for(lambda: queue_state(amqp_uri, SALES)[0] == 0, timeout=30)
    finally:
        stop(erp)

    assert len(postings(engine, "POISON-0001")) == 1
    assert postings(engine, "POISON-0001")[0][1] == FIX_LINE_NO
    assert queue_state(amqp_uri, dlq)[0] == 0
    assert queue_state(amqp_uri, SPY)[0] == 1  # replays went to the erp's queue only

    records = AuditLog(tmp_path / "var" / "dlq" / "audit.jsonl").records()
    assert [(r["action"], r["edited"]) for r in records] == [("replay", False), ("replay", True)]
    edit = records[-1]
    assert edit["user"] == "alice" and edit["message_id"] == event.id and edit["queue"] == SALES
    assert edit["reason"] == "till 07 sent a garbage line number"
    assert edit["changes"] == [{"path": "data.lines.0.line_no", "old": POISON_LINE_NO, "new": FIX_LINE_NO}]
    diff = edit["diff"].splitlines()
    assert [line.split() for line in diff if line[:1] in "-+" and "line_no" in line] == [
        ["-", '"line_no":', f"{POISON_LINE_NO},"], ["+", '"line_no":', f"{FIX_LINE_NO},"]]
    assert records[0]["user"]  # the OS user by default


@pytest.mark.timeout(300)
def test_not_retried_error_parks_at_once_and_list_filters_and_purge(amqp_uri, estate, tmp_path):
    dsn, engine = estate
    config, erp = start_erp(amqp_uri, dsn, tmp_path, {
        **HANDLER, "not_retried": ["ArithmeticError", "sqlalchemy.exc.DataError"]})
    try:
        sale = poison_sale("POISON-0002")
        bad_return = OutgoingMessage(  # not a valid erp.post_return.v1: parked at once as well
            exchange=topology.commands_exchange("erp"), routing_key="erp.post_return.v1",
            message_id="01JDLQTESTRETURN0000000001", type="erp.post_return.v1", body=b'{"not": "a cloudevent"}')
        publish(amqp_uri, event_message(sale, EXCHANGE), bad_return)
        assert wait_for(lambda: queue_state(amqp_uri, topology.dead_letter_queue(SALES))[0] == 1
                        and queue_state(amqp_uri, topology.dead_letter_queue(RETURNS))[0] == 1, timeout=60)
        assert show(config, sale.id)["attempts"] == 1  # not retried
        assert "\"retried\"" not in (tmp_path / "erp.log").read_text()

        def listed(*args):
            result = cli(config, "list", *args)
            assert result.returncode == 0, result.stderr
            return {line.split()[0] for line in result.stdout.splitlines()[:-1]}

        both = {sale.id, bad_return.message_id}
        assert listed() == both
        assert listed("--type", "pos.sale.v1") == {sale.id}
        assert listed("--queue", "*on_post_return") == {bad_return.message_id}
        assert listed("--since", "1h") == both
        assert listed("--since", "2999-01-01T00:00") == set()
        assert listed("--queue", "*on_post_return", "--type", "pos.sale.v1") == set()
        bad = cli(config, "list", "--since", "yesterday-ish")
        assert bad.returncode == 2 and "--since" in bad.stderr
        assert queue_state(amqp_uri, topology.dead_letter_queue(SALES))[0] == 1  # listing took nothing

        assert cli(config, "purge", bad_return.message_id).returncode == 2  # --reason is required
        missing = cli(config, "purge", "01JDLQNOSUCHMESSAGE0000000", "--reason", "x")
        assert missing.returncode == 1 and "no dead letter" in missing.stderr
        purged = cli(config, "purge", bad_return.message_id, "--reason", "garbage from a test till",
                     "--user", "bob")
        assert purged.returncode == 0, purged.stderr
        assert queue_state(amqp_uri, topology.dead_letter_queue(RETURNS))[0] == 0
        assert listed() == {sale.id}
    finally:
        stop(erp)
    assert postings(engine, "POISON-0002") == []
    [record] = AuditLog(tmp_path / "var" / "dlq" / "audit.jsonl").records()
    assert (record["action"], record["user"], record["reason"]) == ("purge", "bob", "garbage from a test till")
    assert record["body"] == '{"not": "a cloudevent"}'  # a purge loses nothing for good


@pytest.mark.timeout(120)
def test_dlq_service_exports_depth_and_oldest_age_without_taking_anything(container_factory, amqp_uri,
                                                                          queues, tmp_path):
    from datetime import datetime, timedelta, timezone

    from bus.constants import H_LAST_FAILURE, H_QUEUE
    from services.dlq.service import DEPTH, OLDEST_AGE, DlqService

    dlq = topology.dead_letter_queue(SALES)
    broker_call(amqp_uri, lambda ch: ch.queue_declare(dlq, durable=True, auto_delete=False))
    parked = (datetime.now(timezone.utc) - timedelta(minutes=10)).isoformat()
    publish(amqp_uri, *[OutgoingMessage(exchange="", routing_key=dlq, message_id=f"01JDQ{n:021d}", body=b"{}",
                                        headers={H_LAST_FAILURE: parked, H_QUEUE: SALES}) for n in range(2)])
    container = container_factory(DlqService, {
        "AMQP_URI": amqp_uri,
        "RETAILBUS": {"root": str(tmp_path), "services": {"erp": {"module": "services.erp"}},
                      "dlq": {"interval": 0.2}}})
    container.start()
    assert wait_for(lambda: DEPTH.labels(dlq)._value.get() == 2, timeout=30)
    assert 600 <= OLDEST_AGE.labels(dlq)._value.get() < 3600
    returns = topology.dead_letter_queue(RETURNS)  # every handler of the configured services
    assert wait_for(lambda: (DEPTH.labels(returns)._value.get(), OLDEST_AGE.labels(returns)._value.get()) == (0, 0))
    container.stop()
    assert queue_state(amqp_uri, dlq)[0] == 2  # sampling took nothing
