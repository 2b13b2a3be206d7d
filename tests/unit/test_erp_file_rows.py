"""The erp applies the warehouse stock snapshot's rows to STK_LVL; a chunk of a row type
no one applies is parked, and the files service refuses to start with such a drop
(real SQLite file with the legacy ERP's schema, worker_factory, no broker)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from nameko.testing.services import worker_factory

from bus.consumer import DUPLICATE, PermanentError
from contracts.batch import BatchItem, EventBatchV1
from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import DEMO_ON_HAND
from services.erp import file_rows
from services.erp.service import ErpService
from services.files import appliers
from tests.unit.test_erp_service import Worker, legacy_db

pytestmark = pytest.mark.unit



@pytest.fixture
def db(tmp_path):
    db = legacy_db(tmp_path / "erp.db")
    from legacy_wrappers import inbox
    inbox.metadata.create_all(db.engine)
    yield db
    db.engine.dispose()


@pytest.fixture
def service(db):
    return Worker(worker_factory(ErpService, db=db), db)


def snapshot(rows: list[tuple[str, str, int]], at: datetime | None = None, item_type="erp.stock_changed.v1",
             sha="b" * 64) -> tuple[EventBatchV1, CloudEvent]:
    # counted a minute after now: after the demo rows the fixture seeded (a module-level stamp
    # would fall behind them when the suite reaches this test minutes after importing it)
    at = at or datetime.now(timezone.utc) + timedelta(minutes=1)
    items = [BatchItem(row=n, idempotencykey=f"{sha}:{n}",
                       data={"store_id": store, "sku": sku, "on_hand": on_hand, "changed_at": at.isoformat()})
             for n, (store, sku, on_hand) in enumerate(rows, start=2)]
    batch = EventBatchV1(item_type=item_type, file="stock_20261127.dat", sha256=sha, items=items)
    return batch, CloudEvent.new("event.batch.v1", "legacy/filedrop/stock", batch, idempotencykey=f"{sha}:chunk:0")


def stock(db) -> dict[tuple[str, str], tuple[int, str]]:
    s = db.tables["STK_LVL"]
    with db.engine.connect() as conn:
        return {(r.STORE_NO, r.SKU): (r.ON_HAND, r.UPD_TS) for r in conn.execute(sa.select(s))}


def test_the_stock_snapshot_reaches_stk_lvl_once(service, db):
    before = stock(db)
    batch, event = snapshot([("S001", "100001", 7), ("S001", "NEW-SKU", 12)])
    assert service.on_file_rows(batch, event) == 2
    after = stock(db)
    assert after[("S001", "100001")][0] == 7 and after[("S001", "NEW-SKU")][0] == 12
    # written now (not at the count's time), so change capture, which follows UPD_TS, sees it
    assert after[("S001", "100001")][1] > before[("S001", "100001")][1]
    assert after[("S002", "100001")] == before[("S002", "100001")]
    assert service.on_file_rows(batch, event) is DUPLICATE  # redelivered: nothing applied twice
    assert stock(db) == after


def test_a_count_older_than_the_rows_last_change_does_not_undo_it(service, db):
    batch, event = snapshot([("S001", "100001", 7)], at=datetime(2020, 1, 1, tzinfo=timezone.utc))
    assert service.on_file_rows(batch, event) == 1  # taken (its key claimed), not applied
    assert stock(db)[("S001", "100001")][0] == DEMO_ON_HAND


def test_a_chunk_of_rows_the_erp_does_not_apply_is_parked_not_acked(service, db):
    batch, event = snapshot([("S001", "100001", 7)])
    odd = EventBatchV1(item_type="loyalty.points_accrued.v1", file=batch.file, sha256=batch.sha256,
                       items=batch.items)
    with pytest.raises(PermanentError, match="applies no 'loyalty.points_accrued.v1' rows"):
        service.on_file_rows(odd, event)
    assert stock(db)[("S001", "100001")][0] == DEMO_ON_HAND


def test_every_shipped_drop_is_applied_and_a_drop_nobody_applies_is_named(monkeypatch):
    assert appliers.unapplied(["customers", "stock"]) == []
    assert set(file_rows.APPLIERS) == {"erp.stock_changed.v1"}
    assert appliers.APPLIED_BY["crm.customer_exported.v1"] == "customers"  # mastered first (services/customers)
    assert appliers.unapplied(["prices"])[0].startswith("inbound.prices: the files service has no row")
    monkeypatch.delitem(appliers.APPLIED_BY, "erp.stock_changed.v1")  # as it was: nobody applied the snapshot
    assert appliers.unapplied(["customers", "stock"]) == [
        "inbound.stock: no service applies its erp.stock_changed.v1 rows"]


def test_the_files_service_does_not_start_with_a_drop_nobody_applies(tmp_path, container_factory):
    import yaml

    from services.files.service import FilesService
    from tests.integration.filedrop_support import write_drops
    drops = write_drops(tmp_path)
    drops["inbound"]["prices"] = {**drops["inbound"]["stock"], "folder": str(tmp_path / "drops" / "prices")}
    (tmp_path / "config" / "filedrops.yaml").write_text(yaml.safe_dump(drops, sort_keys=False))
    container = container_factory(FilesService, {"AMQP_URI": "amqp://127.0.0.1:9",
                                                 "RETAILBUS": {"root": str(tmp_path)}})
    with pytest.raises(appliers.UnappliedDropError, match="inbound.prices: the files service has no row contract"):
        container.start()
