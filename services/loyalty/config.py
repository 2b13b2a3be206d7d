"""`LoyaltyRules`: config/loyalty.yaml for a service, loaded and validated at start.

The path is RETAILBUS.loyalty_rules in bus.yaml. An invalid file stops the
service at start with the field (or the YAML line) that is wrong; the file is
read again when it changes (another inode, mtime or size: `retailbus loyalty
mode` replaces it by a rename), so ops can switch the accrual mode or a
campaign without a restart, and a change that does not validate leaves the
running rules in place (logged).

`optional=True` is for a service that only follows the accrual mode (the files
service writing the legacy points file): without the file it runs by the
defaults, which are today's path (the file earns).
"""
from __future__ import annotations

import logging

from nameko.extensions import DependencyProvider
from nameko.timer import Timer

from bus.settings import retailbus_settings
from services.loyalty.rules import LoyaltyConfig, LoyaltyConfigError, load

log = logging.getLogger(__name__)


class LoyaltyRules(DependencyProvider):
    def __init__(self, optional: bool = False):
        self.optional = optional

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.path = settings.path(settings.loyalty_rules)
        self._stamp = self._file_stamp()
        if self._stamp is None and self.optional:
            log.info("no loyalty rules at %s: the defaults apply (accrual mode file)", self.path)
            self._config = LoyaltyConfig()
        else:
            self._config = load(self.path)  # refuse to start on a bad file

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    @property
    def config(self) -> LoyaltyConfig:
        stamp = self._file_stamp()
        if stamp != self._stamp and stamp is not None:
            self._stamp = stamp
            try:
                previous, self._config = self._config, load(self.path)
                if previous.accrual != self._config.accrual:
                    log.warning("loyalty accrual mode %s -> %s from %s (%s)", previous.accrual.mode,
                                self._config.accrual.mode, self._config.accrual.since, self.path)
            except LoyaltyConfigError as exc:
                log.error("loyalty rules not reloaded, the running ones stay: %s", exc)
        return self._config

    def get_dependency(self, worker_ctx):
        return self


class SettlementSchedule(Timer):
    """nameko's timer, every `settlement.interval_seconds` of the rules file (read at start)."""

    def __init__(self, **kwargs):
        super().__init__(interval=None, **kwargs)

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.interval = load(settings.path(settings.loyalty_rules)).settlement.interval_seconds
