"""Where the three sides live (from bus.yaml and filedrops.yaml) and one
reconciliation of a business day over them; shared by the service's schedule
and `retailbus reconcile`."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from sqlalchemy import Engine, create_engine

from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop.config import DropOut
from services.reconcile import sources, store
from services.reconcile.compare import StoreReport, reconcile
from bus.settings import ConfigError, retailbus_settings

POINTS_DROP = "loyalty_points"


@dataclass
class Estate:
    legacy: Engine
    totals: Engine
    points: DropOut | None
    stores: tuple[str, ...]  # configured in RETAILBUS.stores

    @classmethod
    def from_config(cls, config: dict, config_path: Path | str | None = None,
                    require_legacy: bool = False) -> "Estate":
        """Raises ConfigError naming what is missing or wrong. `require_legacy`: a SQLite
        legacy database must exist already (the CLI must not create an empty one; the
        service may start before the legacy ERP has created it)."""
        settings = retailbus_settings(config, config_path)
        legacy_dsn = settings.absolute_dsn(str(config.get("LEGACY_DB_URI") or ""))
        if not legacy_dsn:
            raise ConfigError("LEGACY_DB_URI: not set")
        sqlite_file = Path(legacy_dsn[len("sqlite:///"):]) if legacy_dsn.startswith("sqlite:///") else None
        if require_legacy and sqlite_file is not None and not sqlite_file.exists():
            raise ConfigError(f"LEGACY_DB_URI: no legacy ERP database at {sqlite_file}")
        try:
            drops = fd_config.for_container({**config, "RETAILBUS": {**config.get("RETAILBUS", {}),
                                                                     "root": str(settings.root)}})
        except fd_config.FileDropConfigError as exc:
            raise ConfigError(str(exc)) from None
        # plain engines: reading must never take the legacy writers' lock (no BEGIN IMMEDIATE)
        return cls(create_engine(legacy_dsn), store.open_engine(settings.absolute_dsn(settings.reconcile.dsn)),
                   drops.outbound.get(POINTS_DROP), tuple(s.id for s in settings.stores))

    def dispose(self):
        self.legacy.dispose()
        self.totals.dispose()


def reconcile_day(estate: Estate, day: date, store_id: str | None = None) -> list[StoreReport]:
    """One report per store: the one asked for, else every store that is configured,
    sent totals for the day or has ERP documents on it."""
    held = store.totals_for(estate.totals, day, store_id)
    stores = [store_id] if store_id else sorted(
        set(estate.stores) | held.keys() | sources.erp_stores(estate.legacy, day))
    return [reconcile(s, day, held.get(s), sources.erp_docs(estate.legacy, s, day),
                      sources.points_rows(estate.points, s, day) if estate.points else None)
            for s in stores]
