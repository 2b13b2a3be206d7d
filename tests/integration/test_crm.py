"""The crm service as a real process on a real broker, against the demo CRM and loyalty
platform over HTTP: posted sales and returns become engagement history once however
often they are delivered, the member's tier reaches the CRM's segments, a customer
update reaches the profile, and the CRM away for a while loses nothing."""
from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher
from contracts.customer import CustomerUpdatedV1
from contracts.envelope import CloudEvent
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1
from tests.conftest import free_port
from tests.integration.support import Platform, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

HANDLERS = (("erp.sale_posted.v1", "on_sale_posted"), ("erp.return_posted.v1", "on_return_posted"),
            ("customer.updated.v1", "on_customer_updated"))


@pytest.fixture
def estate(amqp_uri, tmp_path):
    loyalty = Platform("demo.loyalty_platform", tmp_path / "loyalty.db", free_port())
    crm = Platform("demo.crm", tmp_path / "crm.db", free_port())
    config = write_config(tmp_path, amqp_uri,
                          loyalty_platform={"http": loyalty.url.removeprefix("http://"), "db": "var/l.db"},
                          crm={"http": crm.url.removeprefix("http://"), "db": "var/c.db"},
                          handlers={f"crm.{m}": {"attempts": 12, "delays": [0.5, 1, 2]} for _, m in HANDLERS})
    service = nameko_run(config, "services.crm", tmp_path / "crm.log")
    queues = [topology.handler_queue("erp", t, "crm", m) for t, m in HANDLERS]
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
    ret = posted("S001-01-R", "L1", -5_000, kind=ErpReturnPostedV1, original_pos_txn_id="S001-01-0")
    publish(publisher, [ret, ret])

    def history():
        return crm.rows("SELECT type, reference, amount_minor FROM interactions WHERE customer_id = 'CU1' "
                        "ORDER BY type, reference")
    expected = [("purchase", f"S001/S001-01-{n}", 30_000) for n in range(3)] + [("return", "S001/S001-01-R", 5_000)]
    assert wait_for(lambda: history() == expected, 120), history()
    assert crm.call("GET", "/customers/CU1")[1]["segments"] == ["active", "frequent", "high_value", "tier_gold"]
    assert sum(queue_state(uri, topology.handler_queue("erp", t, "crm", m) + ".dlq")[0] for t, m in HANDLERS) == 0


@pytest.mark.timeout(120)
def test_a_customer_update_reaches_the_profile(estate):
    _, crm, publisher, _ = estate
    update = CustomerUpdatedV1(customer_id="CU7", name="Ada", email="ada@example.org", phone=None,
                               updated_at=datetime.now(timezone.utc))
    publish(publisher, [CloudEvent.new(CustomerUpdatedV1.TYPE, "retailbus/erp", update, subject="CU7",
                                       idempotencykey="customer.updated.v1:CU7:1")])
    assert wait_for(lambda: crm.call("GET", "/customers/CU7")[0] == 200, 60)
    profile = crm.call("GET", "/customers/CU7")[1]
    assert (profile["name"], profile["email"], profile["phone"]) == ("Ada", "ada@example.org", None)
