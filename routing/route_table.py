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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contracts.errors import RetailbusError
from contracts import registry
from contracts.pos import StoreId

Mode = Literal["legacy", "shadow", "bus"]
MODES: tuple[str, ...] = ("legacy", "shadow", "bus")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rollout(_Strict):
    """Listed stores always take the route's mode; `percent` of the others take it too."""

    stores: tuple[StoreId, ...] = ()
    percent: float = Field(0, ge=0, le=100)


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
    version: int = Field(ge=1)
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
        rollout = route.rollout
        if rollout is None or store_id in rollout.stores:
            return route.mode
        return route.mode if store_bucket(store_id) < rollout.percent else "legacy"

    def _by_message(self) -> dict[str, Route]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {r.message: r for r in self.routes}
            object.__setattr__(self, "_index", cached)
        return cached


class RouteTableError(RetailbusError, ValueError):
    """A routes file that cannot become the running table; says where and why."""


class _Loader(yaml.SafeLoader):
    """Plain YAML: nameko's `${ENV}` substitution (registered on SafeLoader) does
    not belong in an audited route table."""


_Loader.yaml_implicit_resolvers = {
    key: [r for r in resolvers if r[0] not in ("!env_var", "!raw_env_var")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error path (or its nearest parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def parse_route_table(text: str, source: str = "routes.yaml") -> RouteTable:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RouteTableError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RouteTableError(f"{source}:1: expected a mapping with version, legacy and routes")
    try:
        return RouteTable.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = tuple(err["loc"])
            line = _line_of(node, path)
            dotted = ".".join(str(p) for p in path) or "<root>"
            problems.append(f"{source}:{line}: {dotted}: {err['msg']}")
        raise RouteTableError("\n".join(problems)) from None


def load_route_table(path: Path | str) -> RouteTable:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RouteTableError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_route_table(text, str(path))
