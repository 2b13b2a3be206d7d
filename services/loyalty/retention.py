"""Retention of the loyalty service's card-less sale lines (LOY_ACCRUAL rows with CARD '').

Every posted sale leaves a row per line, card or not. A card-less sale earned nothing and
redeemed nothing (a loyalty tender must name its hold's card: routing/redemption.py), so
its rows are only read as "a sale the service saw": by the daily settlement (a day of
card-less sales only is settled at zero: lookback_days + close_after_hours of
config/loyalty.yaml) and by reconciliation of a day whose control totals it keeps
(`reconcile_days`). Past the longer of the two (the floor) nothing reads them: they go
after `RETAILBUS.retention.loyalty_cardless_days`, counted as `loyalty_cardless`. A setting
below the floor is refused at start; should a reloaded loyalty.yaml raise the floor
above it, a pass keeps to the floor (logged). Carded rows stay: a return, however late,
takes back from them. A return that names a card against a pruned card-less sale is
answered by the ERP's record of the sale (services/loyalty/accrual.py `plan_reversal`).

The rows go by business day through a partial index of the card-less rows only, so a
pass never walks the carded rows kept below the cut-off.
"""
from __future__ import annotations

import logging
from datetime import date

from nameko.extensions import DependencyProvider
from sqlalchemy import delete, inspect, select, tuple_
from sqlalchemy.engine import Engine

from bus.retention import before, in_batches
from bus.settings import ConfigError, RetailbusSettings, retailbus_settings
from legacy_wrappers.legacy_db import LegacyEngines
from services.loyalty.rules import LoyaltyConfig, LoyaltyConfigError, load
from services.loyalty.tables import ACCRUALS, CARDLESS, CARDLESS_INDEX

log = logging.getLogger(__name__)

WHAT = "loyalty_cardless"


def floor(settings: RetailbusSettings, config: LoyaltyConfig) -> tuple[float, str]:
    """(days, why): the longest window that still reads card-less rows."""
    s = config.settlement
    settling = s.lookback_days + s.close_after_hours / 24
    reconciling = settings.retention.reconcile_days
    if settling > reconciling:
        return settling, (f"the loyalty settlement's lookback_days {s.lookback_days} + close_after_hours "
                          f"{s.close_after_hours:g} ({settings.loyalty_rules})")
    return reconciling, f"retention.reconcile_days {reconciling:g}"


def refusal(settings: RetailbusSettings, config: LoyaltyConfig) -> str | None:
    days, why = floor(settings, config)
    value = settings.retention.loyalty_cardless_days
    if value >= days:
        return None
    return (f"retention.loyalty_cardless_days: {value:g} days is shorter than {days:g} days, {why}: a card-less "
            "sale's lines pruned inside that window would be missing from its settlement or its reconciliation")


def prune_cardless(engine: Engine, older_than: date, limit: int) -> int:
    """Up to `limit` card-less LOY_ACCRUAL rows of business days before `older_than`; how many went."""
    c = ACCRUALS.c
    key = tuple_(c.STORE_ID, c.POS_TXN_ID, c.LINE_NO)
    # one statement, the keys a subquery: SQLite searches the primary key for each (with a list
    # of row values it scans the table, or with CARD = '' repeated the whole partial index)
    oldest = select(c.STORE_ID, c.POS_TXN_ID, c.LINE_NO).where(CARDLESS, c.BUSINESS_DAY < older_than.isoformat())
    with engine.begin() as conn:
        return conn.execute(delete(ACCRUALS).where(key.in_(oldest.limit(limit)))).rowcount


def ensure_index(engine: Engine) -> None:
    """The partial index, on a database made before it too (create_all skips an existing table's)."""
    if ACCRUALS.name in inspect(engine).get_table_names():
        CARDLESS_INDEX.create(engine, checkfirst=True)


class CardlessRetention(DependencyProvider):
    """The card-less rows' pass of the loyalty service (LOYALTY_DB_URI)."""

    engines = LegacyEngines()

    def __init__(self, config_key: str = "LOYALTY_DB_URI"):
        self.config_key = config_key

    def setup(self):
        self.settings = retailbus_settings(self.container.config)
        self.engine = self.engines.engine(self.config_key)
        self._indexed = False
        path = self.settings.path(self.settings.loyalty_rules)
        try:
            config = load(path) if path.exists() else LoyaltyConfig()
        except LoyaltyConfigError:
            return  # the service's LoyaltyRules refuses the file with its own error
        problem = refusal(self.settings, config)
        if problem:
            raise ConfigError(problem)

    def get_dependency(self, worker_ctx):
        return self

    def prune(self, config: LoyaltyConfig) -> int:
        """One pass by the loyalty rules in force."""
        r = self.settings.retention
        days = r.loyalty_cardless_days
        problem = refusal(self.settings, config)
        if problem:
            days = floor(self.settings, config)[0]
            log.error("%s; this pass keeps %g days", problem, days)
        if not self._indexed:
            ensure_index(self.engine)
            self._indexed = True
        cut = before(days).date()
        return in_batches(WHAT, lambda n: prune_cardless(self.engine, cut, n), r.batch, r.max_batches)
