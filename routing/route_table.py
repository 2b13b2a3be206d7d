"""The route table (`config/routes.yaml`): which path each POS message takes.

Ops move traffic from the legacy point-to-point call onto the bus route by
route and store by store. The decision is a pure function over a validated
table, cheap enough to run on every request. An invalid file is refused with
its line and the reason, and the running table stays.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bus import yaml_config
from contracts.errors import RetailbusError
from contracts import registry
from contracts.pos import StoreId

Mode = Literal["legacy", "shadow", "bus"]
MODES: tuple[str, ...] = ("legacy", "shadow", "bus")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rollout(_Strict):
    """Listed stores always take the route's mode; `percent` of the others take it too;
    the stores left run `others`. Left out, `others` means "what they run now": the
    control plane writes that mode into the table it applies, so an applied table
    always says it (see routing/control.py), and never falls back to legacy silently."""

    stores: tuple[StoreId, ...] = ()
    percent: float = Field(0, ge=0, le=100)
    others: Mode | None = None

    def takes(self, store_id: str) -> bool:
        """True when `store_id` is in the rollout (listed, or its hash bucket is below `percent`)."""
        return store_id in self.stores or store_bucket(store_id) < self.percent


class Guard(_Strict):
    """Roll the route back to its previous mode when the new side misbehaves."""

    max_error_rate: float = Field(0.01, ge=0, le=1)
    min_parity: float = Field(0.999, ge=0, le=1)
    window: int = Field(300, gt=0, description="seconds")


class LegacySystem(_Strict):
    base_url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    timeout: float = Field(5.0, gt=0, le=120)


class Route(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$")
    message: str
    legacy: str = Field(pattern=r"^(GET|POST|PUT|DELETE) /\S*$", description="METHOD /path")
    mode: Mode
    rollout: Rollout | None = None
    on_legacy_failure: Literal["fail", "queue"] = "fail"
    guard: Guard | None = None

    @field_validator("message")
    @classmethod
    def _known_message(cls, message: str) -> str:
        if message not in registry.REGISTRY:
            raise ValueError(f"unknown message type {message!r} (known: {', '.join(registry.types())})")
        return message

    @property
    def method(self) -> str:
        return self.legacy.split(" ", 1)[0]

    @property
    def path(self) -> str:
        return self.legacy.split(" ", 1)[1]


@lru_cache(maxsize=65536)
def store_bucket(store_id: str) -> float:
    """A stable position in [0, 100) for a store: the same store always lands on
    the same side, and raising `percent` only moves stores towards the new mode."""
    digest = hashlib.sha256(store_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10000 / 100


class RouteTable(_Strict):
    version: int | None = Field(None, ge=1, description="optional in a file: `routes apply` numbers it")
    legacy: LegacySystem
    routes: tuple[Route, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> "RouteTable":
        for attr in ("name", "message", "legacy"):
            seen: set[str] = set()
            for route in self.routes:
                value = getattr(route, attr)
                if value in seen:
                    raise ValueError(f"two routes share {attr} {value!r}")
                seen.add(value)
        return self

    def route_for(self, message_type: str) -> Route | None:
        return self._by_message().get(message_type)

    def route_named(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)

    def decide(self, message_type: str, store_id: str) -> Mode:
        """The mode for one message of one store: the pure routing decision."""
        route = self._by_message().get(message_type)
        if route is None:
            return "legacy"
        return mode_of(route, store_id)

    def _by_message(self) -> dict[str, Route]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {r.message: r for r in self.routes}
            object.__setattr__(self, "_index", cached)
        return cached


def mode_of(route: Route | None, store_id: str) -> Mode:
    """The mode `route` gives one store. No route: legacy (the call goes where it always
    went). A rollout whose `others` was never resolved (a start-up file written so)
    leaves the other stores on legacy, which is what ran before any table."""
    if route is None:
        return "legacy"
    rollout = route.rollout
    if rollout is None or rollout.takes(store_id):
        return route.mode
    return rollout.others or "legacy"


class RouteTableError(RetailbusError, ValueError):
    """A routes file that cannot become the running table; says where and why."""


class _Loader(yaml.SafeLoader):
    """Plain YAML: nameko's `${ENV}` substitution (registered on SafeLoader) does
    not belong in an audited route table."""


_Loader.yaml_implicit_resolvers = {
    key: [r for r in resolvers if r[0] not in ("!env_var", "!raw_env_var")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _duplicate_routes(data: dict, node: yaml.Node | None, source: str) -> list[str]:
    """Two routes with one name, message or legacy call: pointed at the second one."""
    routes = data.get("routes")
    nodes = node.value if isinstance(node, yaml.MappingNode) else []
    seq = next((v for k, v in nodes if k.value == "routes"), None)
    if not isinstance(routes, list) or not isinstance(seq, yaml.SequenceNode):
        return []
    problems = []
    for attr in ("name", "message", "legacy"):
        first: dict[str, int] = {}
        for i, route in enumerate(routes):
            value = route.get(attr) if isinstance(route, dict) else None
            if not isinstance(value, str):
                continue
            if value in first:
                line = yaml_config.line_of(node, ("routes", i, attr))
                problems.append(f"{source}:{line}: route {attr} '{value}' is already used by the route "
                                f"on line {first[value]}; each route needs its own {attr}")
            else:
                first[value] = yaml_config.line_of(node, ("routes", i))
    return problems


def parse_route_table(text: str, source: str = "routes.yaml") -> RouteTable:
    """The validated table, or RouteTableError naming each problem's line in words."""
    return yaml_config.parse_model(text, RouteTable, source, RouteTableError, (_duplicate_routes,), loader=_Loader)


def load_route_table(path: Path | str) -> RouteTable:
    return yaml_config.load_model(path, RouteTable, RouteTableError, (_duplicate_routes,), loader=_Loader)
