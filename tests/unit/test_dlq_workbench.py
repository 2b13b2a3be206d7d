"""services/dlq: selecting dead letters, checking an edit, the change list and diff,
the audit file, the replayed message, and the depth/age sample."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from contracts.envelope import CloudEvent
from routing.legacy_payload import sale_from_legacy
from bus.constants import (H_ATTEMPTS, H_ERROR, H_EXCHANGE, H_FIRST_FAILURE, H_LAST_FAILURE,
                           H_QUEUE, H_ROUTING_KEY, H_STORE, H_USER)
from services.dlq import service
from services.dlq.store import DeadLetter
from services.dlq.workbench import (AuditError, AuditLog, EditRefused, Selection, changes, check_edit, parse_since,
                                    pretty)
from tests.integration.support import legacy_sale

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
QUEUE = "evt-store_agent-pos.sale.v1--erp.on_pos_sale"


def sale_event(txn_id="T-1") -> CloudEvent:
    return CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale_from_legacy(legacy_sale(txn_id)),
                          subject=txn_id, idempotencykey=f"pos.sale.v1:S001:{txn_id}")


def letter(event: CloudEvent | None = None, *, failed: datetime = NOW, queue: str = QUEUE,
           **headers) -> DeadLetter:
    event = event or sale_event()
    return DeadLetter(
        dlq=f"{queue}.dlq", body=event.to_json(),
        properties={"message_id": event.id, "type": event.type, "correlation_id": event.correlationid,
                    "content_type": "application/cloudevents+json", "user_id": "store-S001"},
        headers={H_ATTEMPTS: 4, H_ERROR: "boom", H_QUEUE: queue, H_FIRST_FAILURE: failed.isoformat(),
                 H_LAST_FAILURE: failed.isoformat(), H_EXCHANGE: "store_agent.events",
                 H_ROUTING_KEY: event.type, H_USER: "store-S001", H_STORE: "S001", **headers},
        delivery_tag=7)


# --- selection --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("30m", NOW - timedelta(minutes=30)),
    ("2h", NOW - timedelta(hours=2)),
    ("1d", NOW - timedelta(days=1)),
    ("90s", NOW - timedelta(seconds=90)),
    ("2026-11-27T10:00", datetime(2026, 11, 27, 10, tzinfo=timezone.utc)),
    ("2026-11-27T10:00+01:00", datetime(2026, 11, 27, 9, tzinfo=timezone.utc)),
])
def test_since_takes_durations_and_iso_times(text, expected):
    assert parse_since(text, NOW) == expected


def test_since_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        parse_since("yesterday", NOW)


def test_selection_filters_by_id_queue_type_and_since():
    sale = letter(failed=NOW - timedelta(hours=3))
    other = letter(queue="evt-files-event.batch.v1--erp.on_file_rows", failed=NOW)
    assert Selection()(sale) and Selection()(other)
    assert Selection(ids=frozenset({sale.id}))(sale) and not Selection(ids=frozenset({sale.id}))(other)
    assert Selection(queue="*on_pos_sale")(sale) and not Selection(queue="*on_pos_sale")(other)
    assert Selection(queue=f"{QUEUE}.dlq")(sale)  # the DLQ's own name works too
    assert Selection(type="pos.*")(sale) and not Selection(type="pos.return.v1")(sale)
    since = Selection(since=NOW - timedelta(hours=1))
    assert not since(sale) and since(other)
    assert not Selection(since=NOW)(letter(**{H_LAST_FAILURE: ""}))  # never failed: not "since"


# --- a dead letter ----------------------------------------------------------------------

def test_describe_names_error_attempts_failures_route_and_user():
    info = letter().describe()
    assert info["attempts"] == 4 and info["error"] == "boom"
    assert info["original_route"] == {"exchange": "store_agent.events", "routing_key": "pos.sale.v1",
                                      "queue": QUEUE}
    assert info["original_user_id"] == "store-S001"
    assert info["first_failure"] == info["last_failure"] == NOW.isoformat()


def test_replayed_message_restarts_the_count_and_keeps_the_route():
    dead = letter()
    message = dead.replay_message(b"{}")
    headers = message.properties["application_headers"]
    assert H_ATTEMPTS not in headers and H_ERROR not in headers and H_FIRST_FAILURE not in headers
    assert headers[H_EXCHANGE] == "store_agent.events" and headers[H_STORE] == "S001"
    assert headers[H_USER] == "store-S001"
    assert "user_id" not in message.properties  # the broker accepts only the replaying user's own
    assert message.properties["message_id"] == dead.id and message.properties["delivery_mode"] == 2


def test_queue_falls_back_to_the_dlq_name():
    dead = letter()
    del dead.headers[H_QUEUE]
    assert dead.queue == QUEUE


# --- editing ----------------------------------------------------------------------------

def edited(dead: DeadLetter, change) -> str:
    doc = json.loads(pretty(dead.body))
    change(doc)
    return json.dumps(doc, indent=2)


def test_a_valid_edit_lists_the_changed_fields_and_a_diff():
    dead = letter()
    edit = check_edit(dead, edited(dead, lambda d: d["data"]["lines"][0].update(line_no=5)))
    assert edit.changes == [{"path": "data.lines.0.line_no", "old": 1, "new": 5}]
    assert '-        "line_no": 1,' in edit.diff and '+        "line_no": 5,' in edit.diff
    assert json.loads(edit.body)["data"]["lines"][0]["line_no"] == 5
    assert b"\n" not in edit.body  # published compact


def test_an_edit_breaking_the_contract_is_refused_with_field_paths():
    dead = letter()
    with pytest.raises(EditRefused) as refused:
        check_edit(dead, edited(dead, lambda d: d["data"].update(total_minor=1, currency="euro")))
    paths = [path for path, _ in refused.value.errors]
    assert "data.total_minor" in paths and "data.currency" in paths


def test_an_edit_breaking_the_envelope_is_refused_with_field_paths():
    dead = letter()
    with pytest.raises(EditRefused) as refused:
        check_edit(dead, edited(dead, lambda d: d.pop("source")))
    assert [path for path, _ in refused.value.errors] == ["source"]


@pytest.mark.parametrize("field, value", [("id", "01JDQ0THER0000000000000000"), ("type", "pos.return.v1")])
def test_id_and_type_cannot_change(field, value):
    dead = letter()
    with pytest.raises(EditRefused, match=f"{field}: cannot change"):
        check_edit(dead, edited(dead, lambda d: d.update({field: value})))


def test_not_json_is_refused():
    with pytest.raises(EditRefused, match="not JSON"):
        check_edit(letter(), "{oops")


def test_changes_report_added_and_removed_keys_and_resized_lists():
    old = {"a": 1, "b": [1, 2], "c": {"x": 1}}
    new = {"a": 1, "b": [1], "c": {"y": 2}}
    assert changes(old, new) == [
        {"path": "b", "old": [1, 2], "new": [1]},
        {"path": "c.x", "old": 1, "new": None, "removed": True},
        {"path": "c.y", "old": None, "new": 2, "added": True},
    ]
    assert changes({"a": 1}, {"a": 1.0}) == [{"path": "a", "old": 1, "new": 1.0}]  # 1 -> 1.0 is a change


# --- audit ------------------------------------------------------------------------------

def test_audit_appends_json_lines(tmp_path):
    audit = AuditLog(tmp_path / "var" / "dlq" / "audit.jsonl")
    assert audit.records() == []
    audit.append({"action": "replay", "at": NOW})
    audit.append({"action": "purge", "body": "é"})
    lines = audit.path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"action": "replay", "at": str(NOW)}
    assert audit.records()[1] == {"action": "purge", "body": "é"}


# --- metrics ----------------------------------------------------------------------------

class Heads:
    """What DeadLetterStore.heads() returns, without a broker."""

    def __init__(self, heads):
        self._heads = heads

    def heads(self):
        return self._heads


def test_sample_sets_depth_and_age_of_the_oldest_per_queue():
    parked = letter(failed=NOW - timedelta(seconds=90))
    got = service.sample(Heads({f"{QUEUE}.dlq": (3, parked), "empty.dlq": (0, None)}), now=NOW)
    assert got == {f"{QUEUE}.dlq": (3, 90.0), "empty.dlq": (0, 0.0)}
    assert service.DEPTH.labels(f"{QUEUE}.dlq")._value.get() == 3
    assert service.OLDEST_AGE.labels(f"{QUEUE}.dlq")._value.get() == 90.0
    assert service.DEPTH.labels("empty.dlq")._value.get() == 0


# --- what a replay may not change -----------------------------------------------------------

@pytest.mark.parametrize("path, change", [
    ("idempotencykey", lambda d: d.update(idempotencykey="pos.sale.v1:S001:T-2")),  # would pass the inbox
    ("subject", lambda d: d.update(subject="T-2")),
    ("data.store_id", lambda d: d["data"].update(store_id="S002")),  # would post for another store
    ("source (its store)", lambda d: d.update(source="store/S002/pos/07")),
])
def test_an_edit_may_not_change_what_identifies_the_message(path, change):
    dead = letter()
    with pytest.raises(EditRefused) as refused:
        check_edit(dead, edited(dead, change))
    assert [p for p, _ in refused.value.errors] == [path]
    assert "cannot change" in refused.value.errors[0][1] and "identifies the message" in refused.value.errors[0][1]


def test_a_body_parked_as_garbage_may_not_be_edited_into_another_stores_message():
    dead = letter()
    good, other = edited(dead, lambda d: None), edited(dead, lambda d: d["data"].update(store_id="S002"))
    dead.body = b"{not json"  # parked at once: no body to compare with, the header still names the store
    assert check_edit(dead, good).changes  # its own store: taken
    with pytest.raises(EditRefused) as refused:
        check_edit(dead, other)
    assert [p for p, _ in refused.value.errors] == ["data.store_id"]
    assert "S001 (x-retailbus-store)" in refused.value.errors[0][1]


def test_the_replay_target_is_the_dlqs_queue_not_the_header():
    forged = letter(**{H_QUEUE: "evt-store_agent-pos.return.v1--erp.on_pos_return"})
    assert forged.queue == QUEUE and forged.dlq == f"{QUEUE}.dlq"
    assert forged.queue_header == "evt-store_agent-pos.return.v1--erp.on_pos_return"
    assert letter().queue_header == QUEUE


def test_an_audit_that_cannot_be_written_raises_audit_error(tmp_path):
    (tmp_path / "var").write_text("a file where the audit folder should be")
    with pytest.raises(AuditError, match="cannot write the audit file"):
        AuditLog(tmp_path / "var" / "dlq" / "audit.jsonl").append({"action": "replay"})
