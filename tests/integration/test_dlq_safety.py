"""`retailbus dlq replay` (the CLI as a subprocess) on a real broker, against what an
attacker or a bad day can do: an audit file that cannot be written replays nothing; a
dead letter whose x-retailbus-queue header names another handler's queue is not sent
there; the audit names the account that ran the command whatever --user and $USER say."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import amqp
import pytest

from bus.constants import H_ATTEMPTS, H_ERROR, H_QUEUE, H_STORE
from bus.publisher import connection_params
from contracts.envelope import CloudEvent
from routing.legacy_payload import sale_from_legacy
from services.dlq.workbench import AuditLog
from tests.integration.support import legacy_sale, queue_state, write_config

pytestmark = pytest.mark.integration

SALES, RETURNS = "test-dlq-safety-sales", "test-dlq-safety-returns"  # two handler queues of this bus
QUEUES = [SALES, RETURNS, f"{SALES}.dlq", f"{RETURNS}.dlq"]


def channel_call(uri: str, fn):
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        return fn(conn.channel())
    finally:
        conn.collect()


@pytest.fixture
def queues(amqp_uri, request):
    def declare(channel):
        for queue in QUEUES:
            channel.queue_declare(queue, durable=True, auto_delete=False)
            channel.queue_purge(queue)

    def delete(channel):
        for queue in QUEUES:
            channel.queue_delete(queue)
    channel_call(amqp_uri, declare)
    request.addfinalizer(lambda: channel_call(amqp_uri, delete))


def park(uri: str, dlq: str, queue_header: str) -> CloudEvent:
    """A sale parked in `dlq` the way the consumer parks one, its x-retailbus-queue as given."""
    event = CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale_from_legacy(legacy_sale("T-DLQ-1")),
                           subject="T-DLQ-1", idempotencykey="pos.sale.v1:S001:T-DLQ-1")
    message = amqp.Message(event.to_json(), message_id=event.id, type=event.type, delivery_mode=2,
                           content_type="application/cloudevents+json",
                           application_headers={H_QUEUE: queue_header, H_ATTEMPTS: 3, H_ERROR: "boom",
                                                H_STORE: "S001"})
    channel_call(uri, lambda channel: channel.basic_publish(message, exchange="", routing_key=dlq))
    return event


def cli(config: Path, *args: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, "-m", "services.cli", "dlq", *args, "--config", str(config)],
                          env=environment, cwd=config.parent.parent, capture_output=True, text=True, timeout=120)


def bus_config(tmp_path: Path, amqp_uri: str, audit_file: str = "var/dlq/audit.jsonl") -> Path:
    return write_config(tmp_path, amqp_uri, services={}, dlq={"queues": [SALES, RETURNS], "audit_file": audit_file})


def depths(uri: str) -> dict[str, int]:
    return {queue: queue_state(uri, queue)[0] for queue in QUEUES}


@pytest.mark.timeout(180)
def test_an_audit_that_cannot_be_written_replays_nothing(amqp_uri, queues, tmp_path):
    event = park(amqp_uri, f"{SALES}.dlq", SALES)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "dlq").write_text("a file where the audit folder should be")
    config = bus_config(tmp_path, amqp_uri)
    result = cli(config, "replay", event.id, "--reason", "ERP is back")
    assert depths(amqp_uri) == {SALES: 0, RETURNS: 0, f"{SALES}.dlq": 1, f"{RETURNS}.dlq": 0}  # nothing sent
    assert result.returncode == 1
    assert "cannot write the audit file" in result.stderr and "still parked" in result.stderr, result.stderr


@pytest.mark.timeout(180)
@pytest.mark.parametrize("edit", [False, True])
def test_a_forged_queue_header_does_not_choose_where_a_replay_goes(amqp_uri, queues, tmp_path, edit):
    event = park(amqp_uri, f"{SALES}.dlq", RETURNS)  # parked with the sales, claims the returns' queue
    config = bus_config(tmp_path, amqp_uri)
    opened = tmp_path / "editor-opened"
    editor = tmp_path / "editor.py"  # an $EDITOR that notes it was asked
    editor.write_text(f"import pathlib\npathlib.Path({str(opened)!r}).touch()\n")
    result = cli(config, "replay", "--all", "--reason", "replay everything", *(["--edit"] if edit else []),
                 EDITOR=f"{sys.executable} {editor}")
    assert not opened.exists()  # not offered for editing either
    assert result.returncode == 1
    assert f"refused {event.id}" in result.stderr and "x-retailbus-queue" in result.stderr, result.stderr
    assert depths(amqp_uri) == {SALES: 0, RETURNS: 0, f"{SALES}.dlq": 1, f"{RETURNS}.dlq": 0}
    assert AuditLog(tmp_path / "var" / "dlq" / "audit.jsonl").records() == []


@pytest.mark.timeout(180)
def test_the_audit_names_the_account_that_ran_the_replay_beside_the_given_user(amqp_uri, queues, tmp_path):
    event = park(amqp_uri, f"{SALES}.dlq", SALES)
    config = bus_config(tmp_path, amqp_uri)
    result = cli(config, "replay", event.id, "--user", "alice", "--reason", "ERP is back",
                 USER="mallory", LOGNAME="mallory")
    assert result.returncode == 0, result.stderr
    assert depths(amqp_uri) == {SALES: 1, RETURNS: 0, f"{SALES}.dlq": 0, f"{RETURNS}.dlq": 0}
    [record] = AuditLog(tmp_path / "var" / "dlq" / "audit.jsonl").records()
    assert (record["action"], record["user"], record["message_id"]) == ("replay", "alice", event.id)
    assert (record["os_user"], record["os_uid"]) == (pwd.getpwuid(os.getuid()).pw_name, os.getuid())
