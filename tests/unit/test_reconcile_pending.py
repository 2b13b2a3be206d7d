"""Reconciliation right after a burst: what the ERP posted after the agent's latest
control totals were taken is pending, not unexpected (plain functions, and
`retailbus reconcile` over a real SQLite legacy DB, no broker)."""
from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from demo.legacy_erp.schema import SLS_HDR, create_schema, engine_for
from services.cli import main
from services.reconcile import store
from services.reconcile.compare import ErpDoc, PointsRow, reconcile, render
from tests.integration.support import write_config
from tests.unit.test_reconcile import DAY, REPO, totals, txn

pytestmark = pytest.mark.unit

TAKEN = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def at_taken(report_totals):
    return report_totals.model_copy(update={"taken_at": TAKEN})


def test_a_posting_after_the_totals_were_taken_is_pending_not_unexpected():
    agent = at_taken(totals([txn("A1")]))
    docs = [ErpDoc("sale", "A1", 3998, "EUR", "S1", stamp(TAKEN - timedelta(minutes=5))),
            ErpDoc("sale", "N1", 3998, "EUR", "S2", stamp(TAKEN + timedelta(seconds=20))),
            ErpDoc("sale", "N2", 3998, "EUR", "S3", stamp(TAKEN - timedelta(seconds=10))),  # within the allowance
            ErpDoc("sale", "X1", 3998, "EUR", "S4", stamp(TAKEN - timedelta(hours=1)))]
    report = reconcile("S001", DAY, agent, docs, [PointsRow("sale", "N1", 39)])
    assert [f.pos_txn_id for f in report.pending] == ["N1", "N2"]
    assert [f.pos_txn_id for f in report.erp_unexpected] == ["X1"]  # long before the totals: a real gap
    assert report.loyalty_unexpected == [] and report.gap == 1
    assert "2 pending (posted after the latest control totals)" in render(report)
    assert "pending             sale   N1" in render(report)


@pytest.fixture
def estate(tmp_path):
    legacy = tmp_path / "legacy.db"
    create_schema(engine_for(f"sqlite:///{legacy}"))
    config = write_config(tmp_path, "amqp://unused", legacy_db=f"sqlite:///{legacy}",
                          stores=[{"id": "S001"}], reconcile={"dsn": "sqlite:///var/reconcile.db"})
    shutil.copy(REPO / "config" / "filedrops.yaml", config.parent / "filedrops.yaml")
    taken = datetime.now(UTC) - timedelta(minutes=1)  # the agent's latest totals, a minute ago
    store.keep_latest(store.open_engine(f"sqlite:///{tmp_path / 'var' / 'reconcile.db'}"),
                      totals([txn("S001-1")]).model_copy(update={"taken_at": taken}))
    with engine_for(f"sqlite:///{legacy}").begin() as conn:
        for n, (pos_id, created) in enumerate([("S001-1", taken - timedelta(seconds=40)),
                                               ("S001-2", datetime.now(UTC))]):  # the burst: just now
            conn.execute(SLS_HDR.insert().values(
                DOC_NO=f"S{n:08d}", DOC_TYPE="S", STORE_NO="S001", TERM_NO="07", POS_TXN_ID=pos_id,
                TXN_DATE="20261127", TOTAL_CENTS=3998, CURRENCY="EUR", CHANNEL="RBUS", CREATED_TS=stamp(created)))
    return config


def test_reconcile_right_after_a_burst_exits_0_and_says_what_is_pending(estate):
    result = CliRunner().invoke(main, ["reconcile", "--date", "2026-11-27", "--config", str(estate)])
    assert result.exit_code == 0, result.output
    assert "OK, 1 pending" in result.output and "S001-2" in result.output
    result = CliRunner().invoke(main, ["reconcile", "--date", "2026-11-27", "--json", "--config", str(estate)])
    [report] = json.loads(result.output)
    assert report["gap"] == 0 and [f["pos_txn_id"] for f in report["pending"]] == ["S001-2"]
    assert report["erp_unexpected"] == []
