"""Where the three sides live (from bus.yaml and filedrops.yaml) and one
reconciliation of a business day over them; shared by the service's schedule
and `retailbus reconcile`. A store that sent digests (v2) is asked for its list
(`GET /control/transactions` on its agent) only when a digest differs."""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import Engine, create_engine

from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop.config import DropOut
from services.loyalty.platform import PlatformClient
from services.loyalty.rules import LoyaltyConfig, LoyaltyConfigError
from services.loyalty.rules import load as load_rules
from services.reconcile import loyalty, loyalty_sources, orders, orders_sources, sources, store
from contracts.control import StoreControlTotalsV1, StoreControlTotalsV2
from routing.edge_auth import TerminalKeys, signed_headers
from routing.store_agent import OPS_TERMINAL
from services.reconcile.compare import StoreReport, digest_report, reconcile
from bus.settings import ConfigError, retailbus_settings
from contracts.errors import RetailbusError

POINTS_DROP = "loyalty_points"


@dataclass
class Estate:
    legacy: Engine
    totals: Engine
    points: DropOut | None
    stores: tuple[str, ...]  # configured in RETAILBUS.stores
    agents: dict[str, tuple[str, Path]] = field(default_factory=dict)  # store -> (host:port, its terminal keys)
    list_timeout: float = 30.0
    loyalty_rules: LoyaltyConfig = field(default_factory=LoyaltyConfig)  # the accrual mode, point value, settlement
    loyalty_db: Engine | None = None  # the loyalty service's database, when it has one: the loyalty side is checked
    platform: PlatformClient | None = None
    loyalty_pending_seconds: float = 120.0
    orders_db: Engine | None = None  # the experience API's database, when it has one: the orders are checked
    # the schedule's memory (store -> (day, what it saw, the report listed for it)): service.py
    settling: dict = field(default_factory=dict)

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
        rules_path = settings.path(settings.loyalty_rules)
        try:
            rules = load_rules(rules_path) if rules_path.exists() else LoyaltyConfig()
        except LoyaltyConfigError as exc:
            raise ConfigError(str(exc)) from None
        loyalty_dsn = settings.absolute_dsn(str(config.get("LOYALTY_DB_URI") or ""))
        loyalty_file = Path(loyalty_dsn[len("sqlite:///"):]) if loyalty_dsn.startswith("sqlite:///") else None
        loyalty_db = None if not loyalty_dsn or (loyalty_file and not loyalty_file.exists()) \
            else create_engine(loyalty_dsn)
        orders_dsn = settings.absolute_dsn(str(config.get("ORDERS_API_DB_URI") or ""))
        orders_file = Path(orders_dsn[len("sqlite:///"):]) if orders_dsn.startswith("sqlite:///") else None
        orders_db = None if not orders_dsn or (orders_file and not orders_file.exists()) else create_engine(orders_dsn)
        # plain engines: reading must never take the legacy writers' lock (no BEGIN IMMEDIATE)
        return cls(create_engine(legacy_dsn), store.open_engine(settings.absolute_dsn(settings.reconcile.dsn)),
                   drops.outbound.get(POINTS_DROP), tuple(s.id for s in settings.stores),
                   {s.id: (s.http, settings.outbox_path(s).parent / "terminal_keys.json") for s in settings.stores},
                   loyalty_rules=rules, loyalty_db=loyalty_db, orders_db=orders_db,
                   loyalty_pending_seconds=settings.reconcile.loyalty_pending_seconds,
                   platform=None if loyalty_db is None else loyalty_sources.platform_client(
                       settings.loyalty_platform.http, 30.0))

    def dispose(self):
        self.legacy.dispose()
        self.totals.dispose()
        for engine in (self.loyalty_db, self.orders_db):
            if engine is not None:
                engine.dispose()

    def file_earns(self, created: str | None) -> bool:
        """Whether the points file earned a posting the ERP booked at `created` (CREATED_TS, UTC;
        not booked or not a time: by the mode now)."""
        try:
            at = datetime.fromisoformat(created or "").replace(tzinfo=timezone.utc)
        except ValueError:
            at = datetime.now(timezone.utc)
        return self.loyalty_rules.accrual.mode_at(at) != "api"

    def points_file_earns_day(self, day: date) -> bool | None:
        """True: the points file earned every posting of `day` (those from the day before on:
        a till's clock, a late store); False: none (the platform did); None: some."""
        modes = self.loyalty_rules.accrual.modes_since(datetime.combine(day - timedelta(days=1), time(),
                                                                        tzinfo=timezone.utc))
        return None if "api" in modes and len(modes) > 1 else "api" not in modes


UNSETTLED = "not asked while the day is still changing"


def reconcile_day(estate: Estate, day: date, store_id: str | None = None, may_list: bool = True) -> list[StoreReport]:
    """One report per store: the one asked for, else every store that is configured,
    sent totals for the day or has ERP documents on it. `may_list` False: a store whose
    digests differ is not asked for its list (its report says UNSETTLED)."""
    held = store.totals_for(estate.totals, day, store_id)
    stores = [store_id] if store_id else sorted(
        set(estate.stores) | held.keys() | sources.erp_stores(estate.legacy, day)
        | (orders_sources.stores_with_orders(estate.orders_db, day) if estate.orders_db is not None else set()))
    return [_one(estate, s, day, held.get(s), may_list) for s in stores]


def _one(estate: Estate, store_id: str, day: date,
         totals: StoreControlTotalsV1 | StoreControlTotalsV2 | None, may_list: bool) -> StoreReport:
    report = _stores_side(estate, store_id, day, totals, may_list)
    if estate.orders_db is not None:
        report = _orders_side(estate, report)
    return _loyalty_side(estate, report) if estate.loyalty_db is not None else report


def _orders_side(estate: Estate, report: StoreReport) -> StoreReport:
    """The experience API's orders vs the ERP's order documents vs the loyalty captures (reconcile/orders.py)."""
    store_id, day = report.store_id, report.business_day
    api = orders_sources.api_orders(estate.orders_db, store_id, day)
    erp = orders_sources.erp_orders(estate.legacy, store_id, day, {o.order_id for o in api})
    ids = {o.order_id for o in api} | {o.order_id for o in erp}
    captured = orders_sources.captured(estate.loyalty_db, store_id, ids) if estate.loyalty_db is not None else None
    since = (datetime.now(timezone.utc) - timedelta(seconds=estate.loyalty_pending_seconds)).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")
    return orders.add_to(report, api, erp, captured, frozenset(o.order_id for o in erp if o.changed >= since))


def _loyalty_side(estate: Estate, report: StoreReport) -> StoreReport:
    """The loyalty platform's ledger vs the loyalty service vs the ERP (services/reconcile/loyalty.py)."""
    store_id, day = report.store_id, report.business_day
    records = loyalty_sources.loyalty_records(estate.loyalty_db, store_id, day)
    wanted = {f"{store_id}/{txn}" for _, txn in loyalty.expected_bookings(records)}
    try:
        listed = loyalty_sources.platform_entries(estate.platform, store_id, day, wanted)
    except loyalty_sources.PlatformUnavailableError as exc:
        return loyalty.unavailable(report, str(exc))
    entries = loyalty_sources.group_entries(listed, store_id)
    known = loyalty_sources.known_txns(estate.loyalty_db, store_id, {txn for _, txn in entries})
    since = datetime.now(timezone.utc) - timedelta(seconds=estate.loyalty_pending_seconds)
    recent = {d.pos_txn_id for d in sources.erp_docs(estate.legacy, store_id, day)
              if d.created >= since.strftime("%Y-%m-%dT%H:%M:%S.%f")}
    recent |= {e["reference"].split("/", 1)[-1] for e in listed if e["created"] >= since.isoformat()}
    return loyalty.add_to(report, records, entries, known,
                          {**loyalty_sources.erp_loyalty_tenders(estate.legacy, store_id, day),
                           **orders_sources.collected_points(estate.legacy, store_id, day)},
                          loyalty_sources.erp_settlements(estate.legacy, store_id, day),
                          estate.loyalty_rules.redemption.point_value_minor,
                          loyalty_sources.day_closed(estate.loyalty_rules, day), frozenset(recent))


def _stores_side(estate: Estate, store_id: str, day: date,
                 totals: StoreControlTotalsV1 | StoreControlTotalsV2 | None, may_list: bool) -> StoreReport:
    taken_at = totals.taken_at if totals else None  # what the latest totals cover: the list's own is later
    file_earns = estate.points_file_earns_day(day) if estate.points else False
    if isinstance(totals, StoreControlTotalsV2):
        erp = sources.erp_digest(estate.legacy, store_id, day)
        # a day the platform earned all of has no points file side to compare digests with (the list does)
        points = sources.points_digest(estate.points, store_id, day) if file_earns is not False else None
        agreed = digest_report(store_id, day, totals, erp, points, unlisted=None if may_list else UNSETTLED)
        if agreed is not None:
            return agreed
        try:
            totals = agent_list(estate, store_id, day, totals.as_of)
        except ListUnavailableError as exc:
            return digest_report(store_id, day, totals, erp, points, unlisted=str(exc))
    return reconcile(store_id, day, totals, sources.erp_docs(estate.legacy, store_id, day),
                     sources.points_rows(estate.points, store_id, day) if estate.points else None, taken_at,
                     estate.file_earns)


class ListUnavailableError(RetailbusError):
    """Raised when a store agent cannot list a day's transactions (down, unknown, or a bad answer)."""


def agent_list(estate: Estate, store_id: str, day: date, as_of: int) -> StoreControlTotalsV1:
    """The store's accepted transactions of `day` up to note `as_of`, asked of its agent."""
    agent = estate.agents.get(store_id)
    if agent is None:
        raise ListUnavailableError(f"store {store_id} is not in RETAILBUS.stores")
    address, keys_path = agent
    path = "/control/transactions?" + urlencode({"day": day.isoformat(), "as_of": as_of})
    url = f"http://{address}{path}"
    try:
        keys = TerminalKeys(keys_path)  # the store's ops key, made on first use as the CLI does
        key = keys.get(OPS_TERMINAL) or bytes.fromhex(keys.add(OPS_TERMINAL))
        request = urllib.request.Request(url, headers=signed_headers(OPS_TERMINAL, key, "GET", path, b""))
        with urllib.request.urlopen(request, timeout=estate.list_timeout) as answer:
            return StoreControlTotalsV1.model_validate(json.load(answer))
    except (OSError, ValueError) as exc:  # refused, timed out, HTTP error, not the contract
        raise ListUnavailableError(f"{url}: {exc}") from None
