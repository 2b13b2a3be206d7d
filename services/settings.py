"""The `RETAILBUS` section of config/bus.yaml as one pydantic model.

nameko reads the same file for its own keys (AMQP_URI, WEB_SERVER_ADDRESS,
LOGGING); we load it with nameko's YAML parser so `${ENV:default}` works the
same whether a service runs under `retailbus up` or plain `nameko run`.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from nameko.cli.main import setup_yaml_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.errors import format_validation_error

DEFAULT_CONFIG = Path("config/bus.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(Strict):
    """The managed local RabbitMQ node (`retailbus broker start`)."""

    home: Path = Path("var/broker")
    port: int = Field(5682, ge=1, le=65535)
    dist_port: int = Field(25682, ge=1, le=65535)
    management_port: int = Field(15682, ge=1, le=65535)
    vhost: str = "retailbus"
    user: str = "retailbus"


class PublisherSettings(Strict):
    confirm_timeout: float = Field(10.0, gt=0, description="seconds a publish waits for its confirm")
    connect_timeout: float = Field(5.0, gt=0)
    window: int = Field(1000, ge=1, description="unconfirmed publishes in flight per process")


class RetrySettings(Strict):
    """Growing delays for a failed handler; after the last one the message is dead-lettered."""

    delays: list[float] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    prefetch: int = Field(64, ge=1)


class HandlerSettings(Strict):
    """Per-handler overrides, keyed `<service>.<method>` under RETAILBUS.handlers."""

    delays: list[float] | None = None
    ordered: bool | None = None


class StoreSettings(Strict):
    id: str = Field(pattern=r"^[A-Z0-9]{1,8}$")
    http: str = Field("127.0.0.1:8101", description="host:port the store agent listens on")
    outbox: Path | None = None


class AgentSettings(Strict):
    """What every store agent runs with (routing/agent.py); per-terminal keys live
    beside the outbox in `terminal_keys.json` (`retailbus agent keys add`)."""

    auth_required: bool = Field(True, description="POS calls must carry a terminal HMAC signature")
    signature_window: float = Field(300.0, gt=0, description="seconds a signed request stays valid")
    max_body: int = Field(256 * 1024, ge=1024, description="largest POS request body in bytes")
    retention_days: float = Field(30.0, ge=0, description="days sent outbox rows are kept")
    stock_rpc_timeout: float = Field(2.0, gt=0, description="seconds to wait for the ERP's stock answer")


class LegacyErpSettings(Strict):
    """The demo legacy ERP that `retailbus up` runs; its database is LEGACY_DB_URI."""

    http: str = "127.0.0.1:8081"


class ServiceSettings(Strict):
    module: str
    metrics_port: int | None = None


class RetailbusSettings(Strict):
    root: Path = Path(".")
    broker: BrokerSettings = BrokerSettings()
    publisher: PublisherSettings = PublisherSettings()
    retry: RetrySettings = RetrySettings()
    handlers: dict[str, HandlerSettings] = Field(default_factory=dict)
    services: dict[str, ServiceSettings] = Field(default_factory=dict)
    stores: list[StoreSettings] = Field(default_factory=list)
    legacy_erp: LegacyErpSettings = LegacyErpSettings()
    agent: AgentSettings = AgentSettings()
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


class ConfigError(Exception):
    pass


def load_config(path: Path | str = DEFAULT_CONFIG) -> dict:
    """The whole bus.yaml as nameko sees it (environment substituted)."""
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
