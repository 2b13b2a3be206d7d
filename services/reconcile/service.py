"""The `reconcile` service: keeps the latest control totals each store agent
sends, and on a schedule reconciles each store's latest business day against
the legacy ERP and the loyalty points file, exporting the gap as
`retailbus_reconciliation_gap{store}`. `retailbus reconcile` runs the same
comparison on demand, from the same database."""
from __future__ import annotations

import logging

from nameko.dependency_providers import Config
from nameko.extensions import DependencyProvider
from nameko.timer import Timer
from prometheus_client import Gauge

from contracts.control import StoreControlTotalsV1, StoreControlTotalsV2
from contracts.envelope import CloudEvent
from bus.consumer import DUPLICATE, reliable_handler
from bus.metrics_http import MetricsHttp
from bus.retention import before, in_batches, retention_timer
from services.reconcile import store
from services.reconcile.compare import StoreReport
from services.reconcile.run import Estate, reconcile_day
from bus.settings import retailbus_settings

log = logging.getLogger(__name__)

GAP = Gauge("retailbus_reconciliation_gap",
            "Missing + duplicated + mismatched transactions of the store's last reconciled business day",
            ["store"])


class ReconcileEstate(DependencyProvider):
    """The legacy ERP, the reconcile database and the points-file drop, from the config."""

    def setup(self):
        self.estate = Estate.from_config(self.container.config)

    def stop(self):
        self.estate.dispose()

    kill = stop

    def get_dependency(self, worker_ctx):
        return self.estate


class Schedule(Timer):
    """nameko's timer, every `RETAILBUS.reconcile.interval` seconds."""

    def __init__(self, **kwargs):
        super().__init__(interval=None, **kwargs)

    def setup(self):
        self.interval = retailbus_settings(self.container.config).reconcile.interval


class ReconcileService:
    name = "reconcile"

    estate = ReconcileEstate()
    metrics = MetricsHttp()
    config = Config()

    @reliable_handler("store_agent", StoreControlTotalsV1.TYPE)
    def on_control_totals(self, totals: StoreControlTotalsV1, event: CloudEvent):
        """Keep it unless a later snapshot of that store and day is held already (agents not on v2 yet)."""
        return None if store.keep_latest(self.estate.totals, totals) else DUPLICATE

    @reliable_handler("store_agent", StoreControlTotalsV2.TYPE)
    def on_control_digests(self, totals: StoreControlTotalsV2, event: CloudEvent):
        """The same for digests: a few hundred bytes per store and day."""
        return None if store.keep_latest(self.estate.totals, totals) else DUPLICATE

    @retention_timer()
    def prune(self) -> int:
        """Snapshots of business days older than RETAILBUS.retention.reconcile_days."""
        r = retailbus_settings(self.config).retention
        return in_batches("reconcile_totals", lambda n: store.prune(self.estate.totals, before(r.reconcile_days).date(), n),
                          r.batch, r.max_batches)

    @Schedule.decorator()
    def reconcile(self) -> dict[str, int]:
        """Each store's latest day. Digests that differ while the day still trades (the ERP
        a few sales behind the totals, or ahead of them) say nothing yet: the store's list
        is asked for once the day has settled (its totals and the ERP unchanged for a
        round), and that report is kept while nothing changes, so a trading day is never
        listed every round."""
        gaps = {}
        for store_id, day in sorted(store.latest_days(self.estate.totals).items()):
            report = self._settled(store_id, day)
            if report is None:
                continue  # still changing: the gauge keeps its last settled value
            GAP.labels(store_id).set(report.gap)
            gaps[store_id] = report.gap
            if report.gap:
                log.warning("store %s, business day %s: %d differences (retailbus reconcile --date %s "
                            "--store %s)", store_id, day, report.gap, day, store_id,
                            extra={"id": f"{store_id}/{day}", "correlationid": None, "outcome": "gap"})
        return gaps

    def _settled(self, store_id: str, day) -> StoreReport | None:
        [report] = reconcile_day(self.estate, day, store_id, may_list=False)
        if not report.digest_mismatch:
            return report
        seen = (day, report.as_of, tuple(sorted((k, s.count) for k, s in report.erp.items())),
                tuple(sorted(report.loyalty.items())))
        last_seen, listed = self.estate.settling.get(store_id, (None, None))
        if seen != last_seen:
            self.estate.settling[store_id] = (seen, None)
            return None
        if listed is None:
            [listed] = reconcile_day(self.estate, day, store_id)
            self.estate.settling[store_id] = (seen, listed)
        return listed
