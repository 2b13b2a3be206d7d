"""Click-and-collect tasks at the store agent (routing/fulfilment.py, fulfilment_http.py) on a real
outbox file: every change an associate makes leaves with its event in one commit, the store decides
handover once (collected is never withdrawn, withdrawn never handed over), a cancellation that
arrives first waits for its task, and an overdue task is withdrawn at the store's clock."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from nameko.testing.services import worker_factory
from werkzeug.test import EnvironBuilder

from bus.settings import AgentSettings
from contracts.envelope import CloudEvent
from contracts.fulfilment import FulfilmentTaskCancelledV1, FulfilmentTaskCreatedV1
from routing.answers import AnswerCache
from routing.edge_auth import TerminalKeys, Verifier, signed_headers
from routing.fulfilment import StoreFulfilment
from routing.outbox import Outbox
from routing.store_agent import StoreAgent

pytestmark = pytest.mark.unit

NOW = datetime.now(timezone.utc)


class Forwarder:
    wakes = 0

    def wake(self):
        self.wakes += 1


@pytest.fixture
def desk(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db")
    fulfilment = StoreFulfilment()
    fulfilment.attach(outbox, "S001", Forwarder())
    yield fulfilment, outbox
    fulfilment.stop()
    outbox.close()


def command(kind, order_id, collect_by=NOW + timedelta(days=3), process="P-", round_=0):
    data = (FulfilmentTaskCreatedV1(order_id=order_id, store_id="S001", customer_id="C00001", collect_by=collect_by,
                                    lines=[{"line_no": 1, "sku": "100001", "quantity": 2}], created_at=NOW)
            if kind == "task" else FulfilmentTaskCancelledV1(order_id=order_id, store_id="S001", cancelled_at=NOW))
    event = CloudEvent.new(data.TYPE, "retailbus/orders", data, correlationid=process + order_id,
                           idempotencykey=f"click_collect:{process}{order_id}:handover:{round_}")
    return data, event


def sent(outbox, keys=False) -> list[tuple]:
    """(type, order id, correlation id) of every event in the outbox (and its idempotency key)."""
    out = []
    for entry in outbox.unsent(100):
        event = CloudEvent.from_json(entry.body)
        out.append((event.type, event.data["order_id"], event.correlationid) + ((event.idempotencykey,) if keys else ()))
    return out


def test_tasks_picked_and_collected_once_each_with_their_event(desk):
    fulfilment, outbox = desk
    assert fulfilment.on_command(*command("task", "W-1")) == "open"
    assert fulfilment.on_command(*command("task", "W-1")) == "open"  # redelivered: one task
    assert [t.order_id for t in fulfilment.book.tasks(("open",))] == ["W-1"]
    assert fulfilment.report("picked", "W-1", "A1")[1] is True
    assert fulfilment.report("picked", "W-1", "A1")[1] is False
    task, changed = fulfilment.report("collected", "W-1", "A1")
    assert changed and task.status == "collected"
    assert fulfilment.report("collected", "W-1", "A2")[1] is False
    assert fulfilment.on_command(*command("cancel", "W-1")) == "remembered or too late"  # handed over already
    # the outcome is the reply to the task's command (its key + ":reply"); the pick is not
    assert sent(outbox, keys=True) == [
        ("fulfilment.picked.v1", "W-1", "P-W-1", "fulfilment.picked.v1:S001:W-1"),
        ("fulfilment.collected.v1", "W-1", "P-W-1", "click_collect:P-W-1:handover:0:reply")]
    assert fulfilment.sweep() == 0
    # an ops retry of the process sends the task under a new key: the outcome is said again under it
    assert fulfilment.on_command(*command("task", "W-1", round_=1)) == "collected"
    assert sent(outbox, keys=True)[-1] == ("fulfilment.collected.v1", "W-1", "P-W-1",
                                            "click_collect:P-W-1:handover:1:reply")
    assert fulfilment.on_command(*command("task", "W-1", round_=1)) == "collected" and len(sent(outbox)) == 3


def test_cancelled_task_is_withdrawn_and_never_handed_over(desk):
    fulfilment, outbox = desk
    fulfilment.on_command(*command("task", "W-2"))
    assert fulfilment.on_command(*command("cancel", "W-2")) == "withdrawn"
    with pytest.raises(Exception, match="withdrawn"):
        fulfilment.report("collected", "W-2", "A1")
    assert fulfilment.on_command(*command("cancel", "W-2")) == "remembered or too late"
    assert sent(outbox) == [("fulfilment.task_withdrawn.v1", "W-2", "P-W-2")]
    assert fulfilment.book.tasks(("open", "picked")) == []


def test_cancellation_before_its_task_withdraws_the_task_as_it_arrives(desk):
    fulfilment, outbox = desk
    fulfilment.on_command(*command("cancel", "W-3"))
    assert sent(outbox) == [] and fulfilment.sweep() == 0  # nothing to say until the task is here
    assert fulfilment.on_command(*command("task", "W-3")) == "withdrawn"
    [(kind, order_id, _)] = sent(outbox)
    assert kind == "fulfilment.task_withdrawn.v1" and order_id == "W-3"
    assert json.loads(outbox.unsent(1)[0].body)["data"]["reason"] == "customer_cancelled"


def test_overdue_task_is_withdrawn_as_not_collected_and_announced_once(desk):
    fulfilment, outbox = desk
    fulfilment.on_command(*command("task", "W-4", collect_by=NOW - timedelta(seconds=1)))
    fulfilment.on_command(*command("task", "W-5"))
    fulfilment.book.expire("W-5")  # not due: nothing happens
    assert fulfilment.book.expire("W-4").status == "withdrawn"  # a crash before its announcement...
    assert sent(outbox) == []
    assert fulfilment.sweep() == 1  # ...which the sweep makes
    assert fulfilment.sweep() == 0
    assert [(k, o) for k, o, _ in sent(outbox)] == [("fulfilment.task_withdrawn.v1", "W-4")]
    assert [t.order_id for t in fulfilment.book.tasks(("open",))] == ["W-5"]


def request(path, keys=None, body=None, method="POST", terminal="A1"):
    data = json.dumps(body).encode() if body is not None else b""
    headers = signed_headers(terminal, keys[terminal], method, path, data) if keys else None
    return EnvironBuilder(method=method, path=path, data=data if method == "POST" else None,
                          content_type="application/json", headers=headers).get_request()


def test_associates_calls_are_signed_and_answer_the_task(desk, tmp_path):
    fulfilment, outbox = desk
    keys = TerminalKeys(tmp_path / "terminal_keys.json")
    keys = {"A1": bytes.fromhex(keys.add("A1")), "file": keys}
    store = SimpleNamespace(store_id="S001", outbox=outbox, fulfilment=fulfilment,
                            config=AgentSettings(auth_required=True), verifier=Verifier(keys["file"]),
                            answers=AnswerCache(300))
    agent = worker_factory(StoreAgent, store=store)
    fulfilment.on_command(*command("task", "W-6"))

    def call(*args, **kw):
        response = (agent.fulfilment_tasks if kw.get("method") == "GET" else
                    agent.fulfilment_picked if args[0].endswith("picked") else agent.fulfilment_collected)(
            request(*args, **kw))
        return response.status_code, json.loads(response.get_data())

    assert call("/v1/fulfilment/tasks", method="GET")[0] == 401
    status, body = call("/v1/fulfilment/tasks", keys, method="GET")
    assert status == 200 and [t["ORDER_ID"] for t in body["TASKS"]] == ["W-6"]
    assert body["TASKS"][0]["LINES"] == [{"LINE_NO": 1, "SKU": "100001", "QTY": 2}]
    status, body = call("/v1/fulfilment/picked", keys, {"ORDER_ID": "W-6"})
    assert status == 200 and body["TASK"]["STATUS"] == "PICKED" and body["DUPLICATE"] is False
    assert call("/v1/fulfilment/collected", keys, {"ORDER_ID": "W-nope"})[0] == 404
    assert call("/v1/fulfilment/collected", keys, {"ORDER_ID": "W-6", "QTY": 1})[0] == 400
    status, body = call("/v1/fulfilment/collected", keys, {"ORDER_ID": "W-6"})
    assert status == 200 and body["TASK"]["STATUS"] == "COLLECTED"
    status, body = call("/v1/fulfilment/collected", keys, {"ORDER_ID": "W-6"})
    assert status == 200 and body["DUPLICATE"] is True
    assert [k for k, _, _ in sent(outbox)] == ["fulfilment.picked.v1", "fulfilment.collected.v1"]
    assert call("/v1/fulfilment/tasks", keys, method="GET")[1]["TASKS"] == []
