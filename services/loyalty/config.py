"""`LoyaltyRules`: config/loyalty.yaml for a service, loaded and validated at start.

The path is RETAILBUS.loyalty_rules in bus.yaml. An invalid file stops the
service at start with the field (or the YAML line) that is wrong; the file is
read again when it changes, so ops can switch the accrual mode or a campaign
without a restart, and a change that does not validate leaves the running
rules in place (logged).
"""
from __future__ import annotations

import logging

from nameko.extensions import DependencyProvider

from bus.settings import retailbus_settings
from services.loyalty.rules import LoyaltyConfig, LoyaltyConfigError, load

log = logging.getLogger(__name__)


class LoyaltyRules(DependencyProvider):
    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.path = settings.path(settings.loyalty_rules)
        self._config = load(self.path)  # refuse to start on a bad file
        self._stamp = self._mtime()

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @property
    def config(self) -> LoyaltyConfig:
        stamp = self._mtime()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                previous, self._config = self._config, load(self.path)
                if previous.accrual.mode != self._config.accrual.mode:
                    log.warning("loyalty accrual mode %s -> %s (%s)", previous.accrual.mode,
                                self._config.accrual.mode, self.path)
            except LoyaltyConfigError as exc:
                log.error("loyalty rules not reloaded, the running ones stay: %s", exc)
        return self._config

    def get_dependency(self, worker_ctx):
        return self
