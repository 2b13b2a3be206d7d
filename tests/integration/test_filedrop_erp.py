"""The CRM customer export end to end: `services.files`, `services.customers` (which masters
the rows) and `services.erp` (which writes the golden records to CUST_MST) as real `nameko run`
processes, a real broker, real folders and the legacy SQLite database."""
from __future__ import annotations

import json
import sqlite3
from contextlib import ExitStack, closing

import amqp
import pytest
from sqlalchemy import text

from demo.batch.jobs import customer_rows, write_customer_export
from demo.legacy_erp.schema import create_schema, engine_for
from bus import topology
from bus.publisher import connection_params
from services.customers.propagation import binding
from tests.integration.filedrop_support import write_drops
from tests.integration.support import nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

QUEUE = topology.handler_queue("files", "event.batch.v1", "customers", "on_file_rows")
MASTERED = topology.handler_queue("customers", binding("erp"), "erp", "on_customer_mastered")
ROWS = 1_201  # three chunks of 500 and a short one


def delete_queues(uri: str, *queues: str) -> None:
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        channel = conn.channel()
        for queue in queues:
            channel.queue_delete(queue)
    finally:
        conn.collect()


@pytest.mark.timeout(240)
def test_crm_export_reaches_cust_mst_exactly_once(amqp_uri, tmp_path, request):
    dsn = f"sqlite:///{tmp_path / 'var' / 'legacy_erp.db'}"
    (tmp_path / "var").mkdir()
    engine = engine_for(dsn)
    create_schema(engine)
    request.addfinalizer(engine.dispose)
    config = write_config(tmp_path, amqp_uri, legacy_db=dsn)
    write_drops(tmp_path)
    # what another test of the session left for the hub or the erp (a mastered write of its customers) is not ours
    delete_queues(amqp_uri, QUEUE, f"{QUEUE}.dlq", MASTERED, f"{MASTERED}.dlq",
                  *(topology.handler_queue(source, "customer.updated.v2", "customers", f"on_{source}_change")
                    for source in ("crm", "erp", "loyalty")))  # the hub's other inputs: test_customers' changes
    request.addfinalizer(lambda: delete_queues(amqp_uri, QUEUE, f"{QUEUE}.dlq", MASTERED, f"{MASTERED}.dlq"))
    folder = tmp_path / "drops" / "customers"
    folder.mkdir(parents=True)  # the CRM's folder exists whether or not the files service started yet

    def cust_mst() -> dict[str, tuple]:
        with engine.connect() as conn:
            return {r[0]: tuple(r[1:]) for r in conn.execute(text(
                "SELECT CUST_NO, NAME, EMAIL, PHONE, LOYALTY_CARD, UPD_TS, MKT_EMAIL, MKT_SMS, DATA_SHARE, "
                "MASTER_ID FROM CUST_MST "
                "WHERE CUST_NO LIKE 'C0%'"))}

    def claimed() -> int:
        with closing(sqlite3.connect(tmp_path / "var" / "customers.db")) as hub:
            return hub.execute("SELECT count(DISTINCT IDEM_KEY) FROM RB_INBOX WHERE CONSUMER = 'customers'").fetchone()[0]

    logs = {name: tmp_path / f"{name}.log" for name in ("erp", "customers", "files")}
    with ExitStack() as stack:
        for name, log in logs.items():
            stack.callback(stop, nameko_run(config, f"services.{name}", log))
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[1] == 1 and queue_state(amqp_uri, MASTERED)[1] == 1,
                        timeout=90), "the hub or the erp did not start: " + logs["customers"].read_text()[-2000:]

        write_customer_export(folder / "customers_20261127.csv", customer_rows(ROWS))
        assert wait_for(lambda: len(cust_mst()) == ROWS, timeout=90), (
            len(cust_mst()), logs["files"].read_text()[-2000:], logs["erp"].read_text()[-2000:])
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[0] == 0, timeout=30)
        assert wait_for(lambda: claimed() == ROWS, timeout=30)

        # the CRM sends the same export again under a new name: no new events, no new effects
        write_customer_export(folder / "customers_20261127_again.csv", customer_rows(ROWS))
        archived = lambda: sorted(p.name for p in (folder / "archive").rglob("customers_*.csv"))  # noqa: E731
        assert wait_for(lambda: len(archived()) == 2, timeout=60), archived()
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[0] == 0, timeout=30)

    rows = cust_mst()
    assert len(rows) == ROWS and claimed() == ROWS
    assert rows["C00000007"][:4] == ("Customer 7", "c7@example.com", "+49 30 0000007", "LC0000000007")
    assert rows["C00000007"][5:] == ("Y", "N", "N", "G00000000007")  # consents, and the golden id it learnt
    assert queue_state(amqp_uri, f"{QUEUE}.dlq")[0] == 0
    files_log = [json.loads(line) for line in logs["files"].read_text().splitlines() if line.startswith("{")]
    assert [line.get("outcome") for line in files_log if "has the content of" in line.get("message", "")] \
        == ["duplicate"]
