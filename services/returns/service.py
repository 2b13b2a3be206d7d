"""The `returns` service: the return-to-refund process (services/returns/process.py).

Thin: a bus-routed `pos.return.v1` (the store agent's) starts a process instance, one per
store and POS id, with the rules in force (config/returns.yaml, config/loyalty.yaml's
threshold promotions); the replies of the erp, loyalty and crm, their refusals and the
workbench's retries drive it (bus/process). This is the one path by which a bus-routed
return reaches the ERP.
"""
from __future__ import annotations

import logging

from nameko.dependency_providers import Config
from nameko.extensions import DependencyProvider

from bus.consumer import reliable_handler
from bus.metrics_http import MetricsHttp
from bus.process import ProcessManager, process_messages
from bus.retention import before, in_batches, retention_timer
from bus.settings import retailbus_settings
from contracts.pos import PosReturnV1
from services.loyalty.config import LoyaltyRules
from services.returns import policy
from services.returns.process import RETURN_TO_REFUND

log = logging.getLogger(__name__)
BATCH = 64


class ReturnRules(DependencyProvider):
    """config/returns.yaml (RETAILBUS.returns_rules): refused at start when invalid, read again
    when it changes (a change that does not validate leaves the running policy, logged)."""

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.path = settings.path(settings.returns_rules)
        self._stamp, self._config = self._file_stamp(), policy.load(self.path)

    def _file_stamp(self):
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    @property
    def config(self) -> policy.ReturnsConfig:
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            try:
                self._config = policy.load(self.path)
            except policy.ReturnsConfigError as exc:
                log.error("return policy not reloaded, the running one stays: %s", exc)
        return self._config

    def get_dependency(self, worker_ctx):
        return self


class ReturnsService:
    name = "returns"

    returns = ProcessManager(RETURN_TO_REFUND, config_key="RETURNS_DB_URI", tables=(policy.metadata,))
    policy = ReturnRules()
    loyalty_rules = LoyaltyRules(optional=True)  # the threshold promotions a return may claw back
    metrics = MetricsHttp()
    config = Config()

    @reliable_handler("store_agent", PosReturnV1.TYPE, batch=BATCH)
    def on_pos_return(self, items: list) -> list:
        rules = {"policy": self.policy.config.policy.model_dump(mode="json"),
                 "earning": self.loyalty_rules.config.earning.model_dump(mode="json")}
        return self.returns.start_many(items, extras={"rules": rules})

    @process_messages(RETURN_TO_REFUND, batch=BATCH)
    def on_process_message(self, items: list) -> list:
        return self.returns.handle_many(items)

    @retention_timer()
    def prune(self) -> int:
        """Receipt-less returns older than the policy's period in force and a margin
        (policy.receiptless_days), a few batches a pass, counted as `returns_receiptless`."""
        settings = retailbus_settings(self.config)
        r = settings.retention
        cut = before(policy.receiptless_days(self.policy.config.policy, settings.redelivery_days())).date()

        def remove(n: int) -> int:
            with self.returns.transaction() as conn:
                return policy.prune_receiptless(conn, cut, n)
        return in_batches("returns_receiptless", remove, r.batch, r.max_batches)
