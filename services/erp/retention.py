"""The erp's share of retention: inbox keys past the redelivery horizon and relay rows
long sent, from the legacy database, a few small batches per pass (bus/retention.py).
The customer hub prunes its own database's the same way (`config_key`)."""
from __future__ import annotations

from nameko.extensions import DependencyProvider

from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import LegacyEngines
from bus.extensions import container_settings
from bus.retention import before, in_batches
from services.erp.outbox import prune_sent


class LegacyRetention(DependencyProvider):
    engines = LegacyEngines()

    def __init__(self, config_key: str = "LEGACY_DB_URI"):
        self.config_key = config_key

    def setup(self):
        self.settings = container_settings(self.container.config)[1].retention
        self.engine = self.engines.engine(self.config_key)

    def get_dependency(self, worker_ctx):
        return self

    def prune(self) -> dict[str, int]:
        r = self.settings
        return {
            "inbox": in_batches("inbox", lambda n: inbox.prune(self.engine, before(r.inbox_days), n),
                                r.batch, r.max_batches),
            "relay_sent": in_batches("relay_sent", lambda n: prune_sent(self.engine, before(r.relay_sent_days), n),
                                     r.batch, r.max_batches),
        }
