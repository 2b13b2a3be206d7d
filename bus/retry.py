"""The retry policy of one reliable handler, as ops set it in config/bus.yaml.

`RETAILBUS.retry` holds the defaults (delays, not_retried); `RETAILBUS.handlers
["<service>.<method>"]` overrides them per handler and may set `attempts`.
The schedule is a plain list of delays because the consumer's retry ladder
is one TTL queue per attempt (bus/topology.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from bus.settings import RetailbusSettings


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...]  # seconds before attempts 2, 3, ...; parked after the last
    not_retried: tuple[str, ...] = ()

    @property
    def attempts(self) -> int:
        return len(self.delays) + 1

    def retries(self, exc: BaseException) -> bool:
        """False when `exc` is (a subclass of) a class listed in not_retried."""
        return not error_matches(exc, self.not_retried)


def error_matches(exc: BaseException, names: tuple[str, ...] | list[str]) -> bool:
    """`names` hold bare class names (`KeyError`) or dotted ones
    (`sqlalchemy.exc.DataError`); every class along the MRO is tried, so
    listing a base class covers its subclasses."""
    wanted = set(names)
    if not wanted:
        return False
    for cls in type(exc).__mro__:
        if cls.__name__ in wanted or f"{cls.__module__}.{cls.__qualname__}" in wanted:
            return True
    return False


def policy_for(settings: RetailbusSettings, handler: str) -> RetryPolicy:
    """The policy of handler `<service>.<method>`: its own delays/attempts/not_retried
    where set, else the RETAILBUS.retry defaults. With more attempts than delays
    the last delay repeats; with fewer the schedule is cut."""
    override = settings.handlers.get(handler)
    delays = list((override and override.delays) or settings.retry.delays)
    attempts = (override and override.attempts) or len(delays) + 1
    schedule = tuple(delays[min(i, len(delays) - 1)] for i in range(attempts - 1))
    not_retried = settings.retry.not_retried if override is None or override.not_retried is None \
        else override.not_retried
    return RetryPolicy(schedule, tuple(not_retried))
