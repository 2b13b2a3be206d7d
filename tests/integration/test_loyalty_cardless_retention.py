"""Retention of the loyalty service's card-less sale lines (services/loyalty/retention.py) on
SQLite and PostgreSQL: LOY_ACCRUAL rows of sales without a card go once their business day
is older than `loyalty_cardless_days`, in batches, counted; younger ones and every carded
row stay; a setting below the windows that read them is refused, naming the field; and a
return naming a card against a pruned card-less sale is not left waiting for it."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, inspect, select

from bus.settings import ConfigError, retailbus_settings
from contracts.erp import ErpReturnPostedV1, OriginalSale, PostedLine
from legacy_wrappers.legacy_db import create_tables, engine_for
from services.loyalty import accrual, retention, tables
from services.loyalty.rules import LoyaltyConfig

pytestmark = pytest.mark.integration

TODAY = datetime.now(timezone.utc).date()


def pruned(what: str) -> float:
    return REGISTRY.get_sample_value("retailbus_pruned_total", {"what": what}) or 0.0


def sale(conn, txn: str, days_old: int, card: str = "", lines: int = 2) -> None:
    day = (TODAY - timedelta(days=days_old)).isoformat()
    for n in range(1, lines + 1):
        accrual.upsert(conn, tables.ACCRUALS, dict(STORE_ID="S001", POS_TXN_ID=txn, LINE_NO=n, CARD=card,
                                                   BUSINESS_DAY=day, SKU="100001", QUANTITY=1,
                                                   LINE_TOTAL_MINOR=1000, POINTS=10 if card else 0))


def left(engine) -> dict[str, int]:
    c = tables.ACCRUALS.c
    with engine.connect() as conn:
        return dict(conn.execute(select(c.POS_TXN_ID, func.count()).group_by(c.POS_TXN_ID)).all())


DEFAULTS = LoyaltyConfig()


def a_pass(engine, config: LoyaltyConfig = DEFAULTS, **retention_fields) -> int:
    """One pass of the service's dependency, by the settings given (else bus.yaml's defaults)."""
    provider = retention.CardlessRetention()
    provider.settings = retailbus_settings({"RETAILBUS": {"retention": retention_fields}})
    provider.engine, provider._indexed = engine, False
    return provider.prune(config)


@pytest.fixture
def engine(legacy_dsn):
    engine = engine_for(legacy_dsn)
    create_tables(engine, tables.metadata)
    yield engine
    engine.dispose()


def test_cardless_lines_past_their_age_go_in_batches_carded_and_younger_ones_stay(engine):
    with engine.begin() as conn:
        sale(conn, "young", 89)                      # inside the default 90 days
        sale(conn, "carded-old", 400, card="LC1")    # a ledger: a late return takes back from it
        sale(conn, "carded-edge", 91, card="LC2")
        for n in range(3):
            sale(conn, f"old-{n}", 91 + n)           # 6 card-less rows past 90 days
    before = pruned("loyalty_cardless")
    assert a_pass(engine, batch=2, max_batches=2) == 4   # two batches of two: the rest waits
    assert pruned("loyalty_cardless") == before + 4
    assert a_pass(engine, batch=2, max_batches=2) == 2
    assert a_pass(engine) == 0
    assert left(engine) == {"young": 2, "carded-old": 2, "carded-edge": 2}


def test_a_pass_keeps_to_a_settlement_window_longer_than_the_setting(engine):
    with engine.begin() as conn:
        sale(conn, "inside-lookback", 95)
        sale(conn, "outside-lookback", 102)
    longer = LoyaltyConfig.model_validate({"settlement": {"lookback_days": 100, "close_after_hours": 2}})
    assert a_pass(engine, longer) == 2  # loyalty.yaml reloaded with a 100-day lookback: 100 days kept
    assert set(left(engine)) == {"inside-lookback"}


def test_a_database_made_before_the_partial_index_gains_it(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP INDEX "IX_LOY_ACCRUAL_CARDLESS"')
    a_pass(engine)
    assert "IX_LOY_ACCRUAL_CARDLESS" in {i["name"] for i in inspect(engine).get_indexes("LOY_ACCRUAL")}


def test_a_setting_below_the_windows_that_read_the_lines_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"retention.loyalty_cardless_days: 30 days is shorter than "
                                          r"retention.reconcile_days 90"):
        retailbus_settings({"RETAILBUS": {"retention": {"loyalty_cardless_days": 30}}})
    settings = retailbus_settings({"RETAILBUS": {"retention": {"loyalty_cardless_days": 40, "reconcile_days": 30}}})
    assert retention.refusal(settings, LoyaltyConfig()) is None  # 40 >= 35 days + 2 hours
    longer = LoyaltyConfig.model_validate({"settlement": {"lookback_days": 60}})
    assert retention.refusal(settings, longer).startswith(
        "retention.loyalty_cardless_days: 40 days is shorter than 60.0833 days, the loyalty settlement's "
        "lookback_days 60 + close_after_hours 2")


def returned(card: str | None, original_card: str | None, known: bool = True) -> ErpReturnPostedV1:
    line = PostedLine(sku="100001", quantity=-1, line_total_minor=-1000)
    original = OriginalSale(doc_no="D1", business_day=TODAY - timedelta(days=200), loyalty_card=original_card,
                            lines=[PostedLine(sku="100001", quantity=1, line_total_minor=1000)])
    return ErpReturnPostedV1(store_id="S001", pos_txn_id="R1", doc_no="D2", business_day=TODAY,
                             posted_at=datetime.now(timezone.utc), currency="EUR", total_minor=-1000,
                             loyalty_card=card, lines=[line], original_pos_txn_id="gone",
                             original_doc_no="D1", original=original if known else None)


def test_a_return_with_a_card_against_a_pruned_cardless_sale_is_not_left_waiting(engine):
    assert accrual.plan_reversal(engine, returned("LC9", None)) is None  # the ERP: the sale had no card
    with pytest.raises(accrual.OriginalNotSeenError):
        accrual.plan_reversal(engine, returned("LC9", "LC9"))          # a carded sale not seen yet: wait
    with pytest.raises(accrual.OriginalNotSeenError):
        accrual.plan_reversal(engine, returned("LC9", None, known=False))  # the ERP does not know it either


def test_the_cut_off_days_own_lines_stay(engine):
    assert retention.prune_cardless(engine, TODAY, 10) == 0
    with engine.begin() as conn:
        sale(conn, "today", 0)
        sale(conn, "yesterday", 1)
    assert retention.prune_cardless(engine, TODAY, 10) == 2
    assert set(left(engine)) == {"today"}


def test_the_service_refuses_to_start_below_its_settlement_window(tmp_path):
    (tmp_path / "loyalty.yaml").write_text("settlement:\n  lookback_days: 100\n")
    provider = retention.CardlessRetention()
    provider.engines = SimpleNamespace(engine=lambda key: None)
    provider.container = SimpleNamespace(config={"RETAILBUS": {"root": str(tmp_path), "loyalty_rules": "loyalty.yaml",
                                                               "retention": {"loyalty_cardless_days": 95}}})
    with pytest.raises(ConfigError, match=r"retention.loyalty_cardless_days: 95 days is shorter than 100.083"):
        provider.setup()
    (tmp_path / "loyalty.yaml").write_text("settlement:\n  lookback_days: 90\n")
    provider.setup()
