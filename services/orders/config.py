"""config/orders.yaml: the click-and-collect rules, validated at start (RETAILBUS.orders_rules).

An invalid file stops the orders services with the field (or the YAML line) that is
wrong. Read when a service starts: a running order keeps the deadlines it was given.
The hold, the reservation and the store's deadline are derived from one figure,
`pickup.collect_days`, so they cannot contradict each other: the store withdraws a
task at its `collect_by`, the ERP reservation outlives that by
`reservation_grace_hours` (a safety net should the process stop), and the loyalty
hold outlives the reservation (the platform keeps a hold at most 7 days).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bus import yaml_config
from bus.settings import ConfigError

MAX_HOLD_SECONDS = 7 * 24 * 3600  # the loyalty platform's longest hold


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pickup(Strict):
    collect_days: float = Field(3.0, gt=0, le=5, description=(
        "days the customer has to collect once the store has the task; then the store withdraws it "
        "and the order is cancelled as not_collected"))
    reservation_grace_hours: float = Field(24.0, ge=0, le=48, description=(
        "the ERP reservation expires this long after collect_by: a safety net, should the process stop"))


class LoyaltyWait(Strict):
    wait_seconds: float = Field(120.0, gt=0, le=480, description=(
        "how long an order waits for the loyalty platform to hold its points; then it is cancelled "
        "as loyalty_unavailable (the hold step's timeout, 600 s, must outlast it)"))


class Sla(Strict):
    """Seconds an order may stay in a state before it counts as stuck (retailbus_orders_stuck, alerted)."""

    accepted: float = Field(300.0, gt=0, description="accepted, not yet reserved")
    reserved: float = Field(4 * 3600.0, gt=0, description="reserved, not yet picked by the store")
    ready_for_pickup: float = Field(6 * 86400.0, gt=0, description="picked, not yet collected nor cancelled")


class Api(Strict):
    clients_file: Path = Field(Path("var/orders_api/client_keys.json"), description=(
        "each ecommerce client's signing key (`retailbus orders keys add --client ID`), mode 0600"))
    signature_window: float = Field(300.0, gt=0, description="seconds a signed request stays valid")


class OrdersConfig(Strict):
    pickup: Pickup = Pickup()
    loyalty: LoyaltyWait = LoyaltyWait()
    sla: Sla = Sla()
    api: Api = Api()

    @property
    def collect_seconds(self) -> float:
        return self.pickup.collect_days * 86400

    @property
    def reservation_seconds(self) -> float:
        return self.collect_seconds + self.pickup.reservation_grace_hours * 3600

    @property
    def hold_seconds(self) -> int:
        """The loyalty hold: past the reservation, by the loyalty wait and an hour."""
        return int(self.reservation_seconds + self.loyalty.wait_seconds + 3600)

    @model_validator(mode="after")
    def _hold_fits(self):
        if self.hold_seconds > MAX_HOLD_SECONDS:
            raise ValueError(f"pickup.collect_days + pickup.reservation_grace_hours (+ the loyalty wait and an hour) "
                             f"is {self.hold_seconds} s: the loyalty platform holds points at most "
                             f"{MAX_HOLD_SECONDS} s")
        return self


def load(path: Path | str) -> OrdersConfig:
    """The file's rules; the defaults when it does not exist. Raises ConfigError naming the line and field."""
    return yaml_config.load_model(path, OrdersConfig, ConfigError, missing_ok=True)
