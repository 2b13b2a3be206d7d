"""The crm service as a real process on a real broker, against the demo CRM and loyalty
platform over HTTP: posted sales and returns (on the return process's command) become
engagement history once however often they are delivered, the member's tier reaches the CRM's segments, the customer
hub's writes reach the profiles (and only the CRM users' changes go back), and the CRM away for a while loses nothing."""
from __future__ import annotations

import json
import time
from datetime import date, datetime, timezone

import amqp
import pytest

from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connection_params
from contracts.customer import CustomerUpdatedV2, CustomerValues
from contracts.mastering import CustomerMasteredV1, CustomerWrite
from services.customers.propagation import binding
from contracts.envelope import CloudEvent
from contracts.erp import ErpSalePostedV1
from contracts.returns import CrmRecordReturnV1
from tests.conftest import free_port
from tests.integration.returns_estate import reply_queue, taken
from tests.integration.support import Platform, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

HANDLERS = (("erp.sale_posted.v1", "on_sale_posted"),)
# a return reaches the CRM on the return process's command (services/returns)
RETURNS = topology.handler_queue("crm", CrmRecordReturnV1.TYPE, "crm", "on_record_return")


@pytest.fixture
def estate(amqp_uri, tmp_path):
    (tmp_path / "var").mkdir()  # the crm service keeps its place in the CRM's change feed there
    loyalty = Platform("demo.loyalty_platform", tmp_path / "loyalty.db", free_port())
    crm = Platform("demo.crm", tmp_path / "crm.db", free_port())
    config = write_config(tmp_path, amqp_uri,
                          loyalty_platform={"http": loyalty.url.removeprefix("http://"), "db": "var/l.db"},
                          crm={"http": crm.url.removeprefix("http://"), "db": "var/c.db"},
                          handlers={f"crm.{m}": {"attempts": 12, "delays": [0.5, 1, 2]} for _, m in HANDLERS})
    service = nameko_run(config, "services.crm", tmp_path / "crm.log")
    queues = [topology.handler_queue("erp", t, "crm", m) for t, m in HANDLERS] + [RETURNS]
    assert wait_for(lambda: all(queue_state(amqp_uri, q)[1] for q in queues), 120), "the crm service did not start"
    publisher = ConfirmingPublisher(amqp_uri, window=100)
    yield loyalty, crm, publisher, amqp_uri
    publisher.close()
    stop(service)
    crm.stop()
    loyalty.stop()


def posted(txn: str, card: str | None, total: int, kind=ErpSalePostedV1, **extra) -> CloudEvent:
    doc = kind(store_id="S001", pos_txn_id=txn, doc_no=f"D-{txn}", business_day=date(2026, 12, 7),
               posted_at=datetime.now(timezone.utc), currency="EUR", total_minor=total, loyalty_card=card,
               lines=[{"sku": "100001", "quantity": 1 if total > 0 else -1, "line_total_minor": total}], **extra)
    return CloudEvent.new(kind.TYPE, "retailbus/erp", doc, subject=txn, idempotencykey=f"{kind.TYPE}:S001:{txn}")


def publish(publisher, events):
    assert publisher.publish_many([event_message(e, "erp.events") for e in events]) == [None] * len(events)


@pytest.mark.timeout(300)
def test_postings_become_engagement_once_and_the_tier_reaches_the_segments(estate):
    loyalty, crm, publisher, uri = estate
    assert loyalty.call("POST", "/members", {"card": "L1", "customer_id": "CU1", "tier": "GOLD"}, "m1")[0] == 201
    crm.call("POST", "/_faults", {"fail_rate": 1.0})  # the CRM away while the first sales arrive
    sales = [posted(f"S001-01-{n}", "L1", 30_000) for n in range(3)]
    publish(publisher, sales + sales + [posted("S001-01-9", None, 500)])
    sales_queue = topology.handler_queue("erp", "erp.sale_posted.v1", "crm", "on_sale_posted")
    assert wait_for(lambda: queue_state(uri, topology.retry_queue(sales_queue, 0.5))[0]
                    + queue_state(uri, topology.retry_queue(sales_queue, 1))[0] > 0, 60), "nothing was retried"
    crm.call("POST", "/_faults", {"fail_rate": 0.0})
    command = CrmRecordReturnV1(store_id="S001", pos_txn_id="S001-01-R", loyalty_card="L1", amount_minor=5_000,
                                posted_at=datetime.now(timezone.utc), original_pos_txn_id="S001-01-0")
    ret = CloudEvent.new(command.TYPE, "retailbus/returns", command, subject="S001:S001-01-R",
                         idempotencykey="return_to_refund:P:crm_history:0")
    replies = reply_queue(uri, "crm", "crm.return_recorded.v1")  # where the process would hear it
    assert publisher.publish_many([event_message(ret, topology.commands_exchange("crm"))] * 2) == [None] * 2

    def history():
        return crm.rows("SELECT type, reference, amount_minor FROM interactions WHERE customer_id = 'CU1' "
                        "ORDER BY type, reference")
    expected = [("purchase", f"S001/S001-01-{n}", 30_000) for n in range(3)] + [("return", "S001/S001-01-R", 5_000)]
    assert wait_for(lambda: history() == expected, 120), history()
    assert crm.call("GET", "/customers/CU1")[1]["segments"] == ["active", "frequent", "high_value", "tier_gold"]
    assert sum(queue_state(uri, topology.handler_queue("erp", t, "crm", m) + ".dlq")[0] for t, m in HANDLERS) == 0
    assert queue_state(uri, RETURNS + ".dlq")[0] == 0
    answers = wait_for(lambda: (got := taken(uri, replies)) and got, 30)
    assert {(a["idempotencykey"], a["correlationid"], a["data"]["customer_id"], a["data"]["recorded"])
            for a in answers} == {("return_to_refund:P:crm_history:0:reply", ret.correlationid, "CU1", True)}


@pytest.mark.timeout(120)
def test_the_hubs_writes_reach_the_profile_and_only_the_users_changes_go_back(estate):
    """customer.mastered.v1 from the customer hub writes the profile through the bulk API; the
    CRM's change feed then reports the CRM user's change to the hub, never the bus's own."""
    _, crm, publisher, uri = estate
    queue = topology.handler_queue("customers", binding("crm"), "crm", "on_customer_mastered")
    assert wait_for(lambda: queue_state(uri, queue)[1], 60)
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    channel = conn.channel()
    topology.declare_exchange(channel, "crm.events")
    tap, *_ = channel.queue_declare("", exclusive=True)  # the broker names it
    channel.queue_bind(tap, "crm.events", CustomerUpdatedV2.TYPE)
    write = CustomerWrite(system="crm", record_id="CU7", golden_id="G00000000007", origin="crm_file",
                          write_golden_id=True, values=CustomerValues(name="Ada", email="ada@example.org",
                                                                      consent_sms=False))
    mastered = CustomerMasteredV1(mastered_at=datetime.now(timezone.utc), writes=[write])
    event = CloudEvent.new(CustomerMasteredV1.TYPE, "retailbus/customers", mastered, idempotencykey="mastered:1")
    assert publisher.publish_many([event_message(event, "customers.events", binding("crm"))] * 2) == [None, None]
    assert wait_for(lambda: crm.call("GET", "/customers/CU7")[0] == 200, 60)
    profile = crm.call("GET", "/customers/CU7")[1]
    assert (profile["name"], profile["email"], profile["golden_id"], profile["consent"]["sms"]) == (
        "Ada", "ada@example.org", "G00000000007", False)
    assert crm.rows("SELECT actor FROM changes WHERE record_id = 'CU7'") == [("retailbus",)]  # written once
    assert crm.call("PUT", "/customers/CU7", {"phone": "+33 1 23"}, "user-edit")[0] == 200  # a CRM user
    statements = []

    def reported():
        while (message := channel.basic_get(tap, no_ack=True)) is not None:
            statements.append(json.loads(message.body)["data"])
        return statements
    assert wait_for(reported, 30)
    time.sleep(1)  # anything more the feed would send (it polls every 0.5 s)
    assert [(s["origin"], s["record_id"], s["values"]["phone"]) for s in reported()] == [("crm", "CU7", "+33 1 23")]
    conn.collect()
