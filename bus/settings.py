"""The `RETAILBUS` section of config/bus.yaml as one pydantic model.

nameko reads the same file for its own keys (AMQP_URI, WEB_SERVER_ADDRESS,
LOGGING); we load it with nameko's YAML parser so `${ENV:default}` works the
same whether a service runs under `retailbus up` or plain `nameko run`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from contracts.errors import RetailbusError
from contracts.errors import format_validation_error
from contracts.pos import Limits

DEFAULT_CONFIG = Path("config/bus.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# An exception class as ops write it in bus.yaml: `KeyError` or `services.erp.posting.SomeError`.
ErrorName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]


class AccessSettings(Strict):
    """Broker permissions (regexes) added to what `retailbus broker users` derives
    from a component's service class: for extensions it cannot read."""

    configure: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)
    read: list[str] = Field(default_factory=list)


class TlsSettings(Strict):
    """AMQPS listener of the managed node (PEM files; relative paths from the project root)."""

    port: int = Field(ge=1, le=65535)
    certfile: Path
    keyfile: Path
    cacertfile: Path


class BrokerSettings(Strict):
    """The managed local RabbitMQ node (`retailbus broker start`)."""

    home: Path = Path("var/broker")
    port: int = Field(5682, ge=1, le=65535)
    dist_port: int = Field(25682, ge=1, le=65535)
    management_port: int = Field(15682, ge=1, le=65535)
    vhost: str = "retailbus"
    user: str = "retailbus"
    nodes: int = Field(1, ge=1, le=9, description="1: one node; N: a local cluster of N nodes "
                       "(`retailbus broker start --nodes N`) on ports port..port+N-1")
    access: dict[str, AccessSettings] = Field(
        default_factory=dict, description="per component (erp, store-agent-S001, …): extra permissions")
    tls: TlsSettings | None = None


class PublisherSettings(Strict):
    confirm_timeout: float = Field(10.0, gt=0, description="seconds a publish waits for its confirm")
    connect_timeout: float = Field(5.0, gt=0)
    window: int = Field(1000, ge=1, description="unconfirmed publishes in flight per process")
    window_bytes: int = Field(8 * 2 ** 20, ge=1024, description="bytes of unconfirmed message bodies in flight "
                              "per process: a burst of large messages (file chunks, change batches) waits "
                              "for the broker instead of queueing in it")


class RetrySettings(Strict):
    """Growing delays for a failed handler; after the last one the message is dead-lettered."""

    delays: list[float] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    prefetch: int = Field(128, ge=1)
    not_retried: list[ErrorName] = Field(
        default_factory=list, description="exception classes parked at once, for every handler")


class HandlerSettings(Strict):
    """Per-handler overrides, keyed `<service>.<method>` under RETAILBUS.handlers."""

    attempts: int | None = Field(None, ge=1, le=100, description=(
        "handler runs before the message is parked (default: one more than the delays); "
        "beyond the schedule the last delay repeats"))
    delays: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, description="backoff schedule in seconds before attempts 2, 3, ...")
    not_retried: list[ErrorName] | None = Field(None, description=(
        "exception classes (name or module.Name, matched along the MRO) parked at once; "
        "replaces RETAILBUS.retry.not_retried for this handler"))
    ordered: bool | None = None
    partitions: int = Field(1, ge=1, le=64, description=(
        "ordered handlers: K > 1 splits the handler's queue into K queues by store (RabbitMQ's "
        "consistent-hash exchange on x-retailbus-store), each with a single active consumer, so "
        "K processes post in parallel and each store stays in order; change K only with the "
        "queues drained (a store may move to another queue)"))
    standby_after: float = Field(10.0, ge=0, description=(
        "seconds a process of a partitioned handler waits before it stands by for the partitions "
        "it does not own (it takes one over at once when its owner dies)"))
    resequence_window: float = Field(10.0, ge=0, description=(
        "ordered handlers: seconds a store's message waits for a predecessor not yet seen "
        "(x-retailbus-store-seq, bus/resequence.py) before the store goes on without it; long "
        "enough for a store agent's resend after a nack, its breaker's reset included; 0: never waits"))


class DlqSettings(Strict):
    """The dead-letter workbench (`retailbus dlq`) and the dlq service."""

    audit_file: Path = Field(Path("var/dlq/audit.jsonl"), description="append-only JSON lines of replays and purges")
    interval: float = Field(15.0, gt=0, description="seconds between dead-letter depth/age samples")
    queues: list[str] = Field(default_factory=list, description=(
        "handler queues of services not in RETAILBUS.services whose `<queue>.dlq` is watched too"))


class StoreSettings(Strict):
    id: str = Field(pattern=r"^[A-Z0-9]{1,8}$")
    http: str = Field("127.0.0.1:8101", description="host:port the store agent listens on")
    outbox: Path | None = None


class AgentSettings(Strict):
    """What every store agent runs with (routing/store_agent.py); per-terminal keys live
    beside the outbox in `terminal_keys.json` (`retailbus agent keys add`)."""

    auth_required: bool = Field(True, description="POS calls must carry a terminal HMAC signature")
    signature_window: float = Field(300.0, gt=0, description="seconds a signed request stays valid")
    max_body: int = Field(256 * 1024, ge=1024, description="largest POS request body in bytes; "
                                                           "a larger one is refused 413 before it is read")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's line "
                                                          "and headers once it started (else 408, closed)")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client has to send a request's body, "
                                                        "and to take the answer (else 408, closed)")
    idle_timeout: float = Field(60.0, gt=0, description="seconds a connection may wait for its next "
                                                        "request before the agent closes it")
    max_connections: int = Field(512, ge=1, description="open POS connections at most; one more is "
                                                        "answered 503 and closed")
    retention_days: float = Field(30.0, ge=0, description="days sent outbox rows are kept")
    stock_rpc_timeout: float = Field(2.0, gt=0, description="seconds to wait for the ERP's stock answer")
    loyalty_rpc_timeout: float = Field(3.0, gt=0, description="seconds to wait for loyalty to authorise a "
                                                              "redemption before the agent authorises it offline; "
                                                              "longer than the loyalty service's own platform "
                                                              "timeout (2 s), so the service gives up first rather "
                                                              "than make a hold the agent no longer waits for")
    control_totals_interval: float = Field(60.0, gt=0, description="seconds between control-totals rounds")
    control_totals_days: float = Field(3.0, gt=0, description="business days touched this many days back "
                                                              "are republished when they change")
    limits: Limits = Field(default_factory=Limits, description="bounds on a sale's or return's quantities "
                                                               "and amounts taken on the bus path (400 beyond)")


class LegacyErpSettings(Strict):
    """The demo legacy ERP that `retailbus up` runs; its database is LEGACY_DB_URI."""

    http: str = "127.0.0.1:8081"


class PlatformSettings(Strict):
    """A simulated SaaS platform of the estate that `retailbus up` runs (demo/loyalty_platform, demo/crm)."""

    http: str = Field(description="host:port its HTTP API listens on")
    db: Path = Field(description="its own SQLite file (relative to the project root)")


class JournalSettings(Strict):
    """Message tracing (bus/journal.py, the journal service, `retailbus trace`)."""

    enabled: bool = Field(True, description="record every hop of every message in the journal")
    dsn: str = Field("sqlite:///var/journal.db", description="the journal database (SQLAlchemy URL)")
    flush_seconds: float = Field(0.2, gt=0, description="how often a process sends its buffered hops")
    batch: int = Field(500, ge=1, description="hops per journal message")
    buffer: int = Field(50_000, ge=1, description="hops a process keeps while the bus is away; more are dropped")


class ReconcileSettings(Strict):
    """Reconciliation (services/reconcile, `retailbus reconcile`): control totals vs ERP vs loyalty file."""

    dsn: str = Field("sqlite:///var/reconcile.db", description="the latest control totals per store and day")
    interval: float = Field(300.0, gt=0, description="seconds between scheduled reconciliations")
    loyalty_pending_seconds: float = Field(120.0, ge=0, description=(
        "a loyalty finding of a transaction the ERP or the platform booked this recently is pending, "
        "not a gap: the loyalty service may not have handled it yet"))


class CasesSettings(Strict):
    """The business exception workbench (services/cases, `retailbus cases`)."""

    dsn: str = Field("sqlite:///var/cases.db", description="the cases service's database (SQLAlchemy URL)")
    rules: Path = Field(Path("config/cases.yaml"), description="case types and their SLAs "
                        "(services/cases/rules.py); read at start")
    interval: float = Field(15.0, gt=0, description="seconds between samples of the open-case gauges")
    rpc_timeout: float = Field(10.0, gt=0, description="seconds `retailbus cases assign|resolve|retry` wait "
                               "for the cases service; a request it did not take by then expires unapplied")


class RetentionSettings(Strict):
    """How long what piles up is kept (bus/retention.py; `retailbus_pruned_total{what}` counts
    what went). Pruning runs every `interval` seconds in batches of `batch`, so it never holds
    a hot path's lock for long. Days are floats: tests and soaks set minutes."""

    interval: float = Field(60.0, gt=0, description="seconds between pruning passes of each service")
    batch: int = Field(500, ge=1, le=10_000, description="rows (or files) removed per statement")
    max_batches: int = Field(20, ge=1, description="batches per pass and kind: the rest waits for the next pass")
    journal_days: float = Field(7.0, gt=0, description="days of message hops the journal keeps")
    journal_max_mb: float = Field(2048.0, gt=0, description="the journal's size in MiB past which its "
                                                            "oldest hops go, whatever their age")
    dlq_days: float = Field(7.0, ge=0, description="days within which ops replay or purge a parked "
                                                   "message: a replay must still find its inbox key")
    inbox_days: float = Field(45.0, gt=0, description="days an inbox key is kept; at least the redelivery "
                                                      "horizon (agent.retention_days + dlq_days + the "
                                                      "longest retry schedule), else the config is refused")
    relay_sent_days: float = Field(7.0, gt=0, description="days the erp's sent RB_OUTBOX rows are kept")
    ledger_days: float = Field(45.0, gt=0, description="days the file-drop ledger keeps a finished file's "
                                                       "record and an outbound file's row keys; at least "
                                                       "the redelivery horizon, like inbox_days")
    reconcile_days: float = Field(90.0, gt=0, description="business days of control totals reconcile keeps")
    process_days: float = Field(30.0, gt=0, description="days a completed process instance (and its history) "
                                                        "is kept after its last change; running, compensating "
                                                        "and failed ones (a case is open) are never pruned")
    cases_days: float = Field(90.0, gt=0, description="days a resolved case (and its history) is kept after "
                                                      "its resolution; open and assigned ones are never pruned")
    loyalty_cardless_days: float = Field(90.0, gt=0, description="business days the loyalty service keeps "
                                                                 "the LOY_ACCRUAL lines of a sale without a "
                                                                 "card (carded ones stay); at least "
                                                                 "reconcile_days and the loyalty settlement's "
                                                                 "lookback (config/loyalty.yaml), else refused")
    outbound_files_days: float = Field(30.0, gt=0, description="days a handed-over outbound batch file "
                                                               "(and its done marker) stays in its folder")
    archive_days: float = Field(30.0, gt=0, description="days an inbound file stays in archive/YYYY-MM-DD/")
    files_action: Literal["delete", "move"] = Field("delete", description="what happens to an aged file: "
                                                                          "deleted, or moved to move_to")
    move_to: Path | None = Field(None, description="with files_action move: the folder aged files go to "
                                                   "(a subfolder per drop)")
    wal_idle_seconds: float = Field(30.0, gt=0, description="a store outbox idle this long has its WAL "
                                                            "checkpointed and truncated")

    @model_validator(mode="after")
    def _move_needs_a_folder(self):
        if self.files_action == "move" and self.move_to is None:
            raise ValueError("move_to: required when files_action is move")
        return self


class ProcessStepSettings(Strict):
    """Overrides of one step of a process definition (bus/process/definition.py `Step`)."""

    timeout: float | None = Field(None, gt=0, description="seconds without a reply before the command is sent again")
    resends: int | None = Field(None, ge=0, le=100, description="times it is sent again before the step has failed")


class ProcessSettings(Strict):
    """A process engine instance (bus/process), keyed by process name under RETAILBUS.processes."""

    poll_seconds: float = Field(1.0, gt=0, le=60, description="how often due timeouts are looked for")
    steps: dict[str, ProcessStepSettings] = Field(default_factory=dict, description=(
        "per step name: timeout and resends replacing the definition's"))


class CustomersSettings(Strict):
    """Customer mastering (services/customers, `retailbus customers`); its database is CUSTOMERS_DB_URI."""

    rules: Path = Field(Path("config/customers.yaml"), description="system-of-record boundaries, survivorship "
                        "and matching keys (services/customers/config.py); read when the service starts")


class ServiceSettings(Strict):
    module: str
    metrics_port: int | None = None
    processes: int = Field(1, ge=1, le=64, description=(
        "processes `retailbus up` runs; process i (from 0) of N owns the partitions p with "
        "p % N == i of its partitioned handlers and serves its metrics on metrics_port + 100 * i"))
    http: str | None = Field(None, description="host:port of its HTTP API (handed to it as WEB_SERVER_ADDRESS)")


class RetailbusSettings(Strict):
    root: Path = Path(".")
    broker: BrokerSettings = BrokerSettings()
    publisher: PublisherSettings = PublisherSettings()
    retry: RetrySettings = RetrySettings()
    dlq: DlqSettings = DlqSettings()
    queue_type: Literal["classic", "quorum"] = Field(
        "classic", description="type of every queue retailbus declares (quorum: replicated on a cluster)")
    handlers: dict[str, HandlerSettings] = Field(default_factory=dict)
    services: dict[str, ServiceSettings] = Field(default_factory=dict)
    stores: list[StoreSettings] = Field(default_factory=list)
    legacy_erp: LegacyErpSettings = LegacyErpSettings()
    loyalty_platform: PlatformSettings = Field(
        PlatformSettings(http="127.0.0.1:8091", db=Path("var/loyalty_platform.db")),
        description="the loyalty platform (members, point ledger, holds)")
    loyalty_rules: Path = Field(Path("config/loyalty.yaml"), description="earning and redemption rules "
                                "(services/loyalty/rules.py); re-read when the file changes")
    loyalty_audit: Path = Field(Path("var/loyalty/audit.jsonl"), description="append-only JSON lines of "
                                "accrual mode switches (`retailbus loyalty mode`)")
    crm: PlatformSettings = Field(PlatformSettings(http="127.0.0.1:8092", db=Path("var/crm.db")),
                                  description="the CRM (profiles, consent, engagement history, segments)")
    processes: dict[str, ProcessSettings] = Field(default_factory=dict, description=(
        "process engine settings by process name (bus/process)"))
    returns_rules: Path = Field(Path("config/returns.yaml"), description="the return authorisation policy and "
                                "threshold promotions (services/returns/policy.py)")
    orders_rules: Path = Field(Path("config/orders.yaml"), description="click and collect: the pickup deadline, "
                               "the loyalty wait, the SLAs, the API's client keys (services/orders/config.py)")
    customers: CustomersSettings = CustomersSettings()
    agent: AgentSettings = AgentSettings()
    journal: JournalSettings = JournalSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    cases: CasesSettings = CasesSettings()
    retention: RetentionSettings = RetentionSettings()
    routes_file: Path = Path("config/routes.yaml")
    routes_state: Path = Path("var/routes")

    def path(self, p: Path | str) -> Path:
        """Relative paths in bus.yaml are relative to the project root."""
        p = Path(p)
        return p if p.is_absolute() else (self.root / p)

    def absolute_dsn(self, dsn: str) -> str:
        """A relative SQLite path is taken from the project root."""
        prefix = "sqlite:///"
        if dsn.startswith(prefix) and not dsn.startswith(prefix + "/"):
            return prefix + str(self.path(dsn[len(prefix):]).resolve())
        return dsn

    def outbox_path(self, store: StoreSettings) -> Path:
        return self.path(store.outbox or Path("var/stores") / store.id / "outbox.db")

    def redelivery_days(self) -> float:
        """How long after its first delivery a message can still arrive again: a sent
        outbox row replayed, a parked message replayed, the longest retry schedule."""
        def waits(delays: list[float], attempts: int | None) -> float:
            """Seconds between the first and the last attempt; beyond the delays the last repeats."""
            retries = len(delays) if attempts is None else attempts - 1
            return sum(delays[:retries]) + (delays[-1] if delays else 0) * max(retries - len(delays), 0)
        retrying = max([waits(self.retry.delays, None)] + [waits(h.delays or self.retry.delays, h.attempts)
                                                            for h in self.handlers.values()]) / 86400
        return self.agent.retention_days + self.retention.dlq_days + retrying

    @model_validator(mode="after")
    def _keys_outlive_redeliveries(self):
        floor = self.redelivery_days()
        for name in ("inbox_days", "ledger_days"):
            value = getattr(self.retention, name)
            if value < floor:
                raise ValueError(
                    f"retention.{name}: {value:g} days is shorter than a message can be redelivered: "
                    f"{floor:g} days (agent.retention_days {self.agent.retention_days:g} + retention.dlq_days "
                    f"{self.retention.dlq_days:g} + the longest retry schedule); a key pruned before its "
                    f"message stops coming back would let it apply twice")
        return self

    @model_validator(mode="after")
    def _cardless_lines_outlive_reconciliation(self):
        """The settlement's part of the floor is in config/loyalty.yaml: the loyalty service
        checks it at start (services/loyalty/retention.py)."""
        r = self.retention
        if r.loyalty_cardless_days < r.reconcile_days:
            raise ValueError(f"retention.loyalty_cardless_days: {r.loyalty_cardless_days:g} days is shorter than "
                             f"retention.reconcile_days {r.reconcile_days:g}: reconciling a day it keeps would "
                             "miss the card-less sales the loyalty service saw")
        return self

    @model_validator(mode="after")
    def _notes_outlive_the_totals_window(self):
        if self.agent.retention_days < self.agent.control_totals_days:
            raise ValueError(f"agent.retention_days: {self.agent.retention_days:g} is shorter than "
                             f"agent.control_totals_days {self.agent.control_totals_days:g}: a restarted agent "
                             "would count a day it still publishes without its compacted notes")
        return self

    @model_validator(mode="after")
    def _retries_have_delays(self):
        for key, handler in self.handlers.items():
            if (handler.attempts or 1) > 1 and not (handler.delays or self.retry.delays):
                raise ValueError(f"handlers.{key}.attempts: {handler.attempts} attempts need delays "
                                 "(set handlers.<key>.delays or retry.delays)")
        return self


class ConfigError(RetailbusError):
    """Raised when a config file (bus.yaml and the files it names) is missing or invalid; says where."""


def load_config(path: Path | str = DEFAULT_CONFIG) -> dict:
    """The whole bus.yaml as nameko sees it (environment substituted)."""
    # Here, not at the top: nameko.cli.main imports pkg_resources (~6 MiB, ~0.2 s),
    # which a service container that never reads bus.yaml itself need not carry.
    from nameko.cli.main import setup_yaml_parser

    setup_yaml_parser()
    path = Path(path)
    try:
        with path.open() as f:
            return yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None


def retailbus_settings(config: dict, config_path: Path | str | None = None) -> RetailbusSettings:
    """Validate the RETAILBUS section; errors name the field path."""
    section = dict(config.get("RETAILBUS") or {})
    if "root" not in section:
        root = Path(config_path).resolve().parent.parent if config_path else Path(os.getcwd())
        section["root"] = root
    try:
        return RetailbusSettings.model_validate(section)
    except ValidationError as exc:
        where = f"{config_path}: " if config_path else ""
        raise ConfigError(where + format_validation_error(exc, prefix="RETAILBUS")) from None
