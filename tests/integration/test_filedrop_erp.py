"""The CRM customer export end to end: `services.files` and `services.erp` as real
`nameko run` processes, a real broker, real folders and the legacy SQLite database."""
from __future__ import annotations

import json
from contextlib import ExitStack

import amqp
import pytest
from sqlalchemy import text

from demo.batch.jobs import customer_rows, write_customer_export
from demo.legacy_erp.schema import create_schema, engine_for
from bus import topology
from bus.publisher import connection_params
from tests.integration.filedrop_support import write_drops
from tests.integration.support import nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

QUEUE = topology.handler_queue("files", "event.batch.v1", "erp", "on_file_rows")
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
    request.addfinalizer(lambda: delete_queues(amqp_uri, QUEUE, f"{QUEUE}.dlq"))
    folder = tmp_path / "drops" / "customers"
    folder.mkdir(parents=True)  # the CRM's folder exists whether or not the files service started yet

    def cust_mst() -> dict[str, tuple]:
        with engine.connect() as conn:
            return {r[0]: tuple(r[1:]) for r in conn.execute(text(
                "SELECT CUST_NO, NAME, EMAIL, PHONE, LOYALTY_CARD, UPD_TS FROM CUST_MST "
                "WHERE CUST_NO LIKE 'C0%'"))}

    def claimed() -> int:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT count(*) FROM RB_INBOX WHERE CONSUMER = 'erp.on_file_rows'")).scalar()

    logs = {name: tmp_path / f"{name}.log" for name in ("erp", "files")}
    with ExitStack() as stack:
        for name, log in logs.items():
            stack.callback(stop, nameko_run(config, f"services.{name}", log))
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[1] == 1, timeout=90), \
            "the erp's file-rows consumer did not start: " + logs["erp"].read_text()[-2000:]

        write_customer_export(folder / "customers_20261127.csv", customer_rows(ROWS))
        assert wait_for(lambda: len(cust_mst()) == ROWS, timeout=90), (
            len(cust_mst()), logs["files"].read_text()[-2000:], logs["erp"].read_text()[-2000:])
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[0] == 0, timeout=30)
        assert claimed() == ROWS

        # the CRM sends the same export again under a new name: no new events, no new effects
        write_customer_export(folder / "customers_20261127_again.csv", customer_rows(ROWS))
        archived = lambda: sorted(p.name for p in (folder / "archive").rglob("customers_*.csv"))  # noqa: E731
        assert wait_for(lambda: len(archived()) == 2, timeout=60), archived()
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[0] == 0, timeout=30)

    rows = cust_mst()
    assert len(rows) == ROWS and claimed() == ROWS
    assert rows["C00000007"] == ("Customer 7", "c7@example.com", "+49 30 0000007", "LC0000000007",
                                 "2026-11-27T06:00:00.000000")
    assert queue_state(amqp_uri, f"{QUEUE}.dlq")[0] == 0
    files_log = [json.loads(line) for line in logs["files"].read_text().splitlines() if line.startswith("{")]
    assert [line.get("outcome") for line in files_log if "has the content of" in line.get("message", "")] \
        == ["duplicate"]
