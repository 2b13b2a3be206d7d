"""What applying a routes file would do to each store, before anything is applied.

A table says modes by rule (a rollout's listed stores, a percent by hash, the
others); ops think in stores ("S002 stays on bus"). The plan turns the file
into the exact table the agents will get and into one line per route and
store, `before -> after`:
- the version: the file's if it has one (it must be ahead of the active
  table: a lower one means the file was written before the last apply or
  rollback), else the next one, written into the text;
- `others:` left out of a rollout is resolved to what those stores run now
  and written into the text, so the applied version says it; stores that run
  different modes now cannot be kept by one word, and the file must say;
- a rollout naming a store that is not configured is refused (a typo would
  otherwise route nobody);
- a move towards legacy (bus -> shadow -> legacy) is backward: the caller
  refuses it unless the operator allows it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import yaml

from routing.route_table import Mode, RouteTable, RouteTableError, mode_of, parse_route_table

RANK = {"legacy": 0, "shadow": 1, "bus": 2}


@dataclass(frozen=True)
class Move:
    route: str
    store: str
    before: Mode
    after: Mode

    @property
    def backward(self) -> bool:
        return RANK[self.after] < RANK[self.before]

    def __str__(self) -> str:
        if self.before == self.after:
            return f"{self.store}: {self.after} (unchanged)"
        return f"{self.store}: {self.before} -> {self.after}" + ("   BACKWARD" if self.backward else "")


@dataclass
class Plan:
    table: RouteTable       # as the agents will run it: numbered, `others` resolved
    text: str
    before: RouteTable | None
    moves: list[Move]
    notes: list[str] = field(default_factory=list)

    @property
    def backward(self) -> list[Move]:
        return [m for m in self.moves if m.backward]

    def lines(self) -> list[str]:
        """Every store's mode per route, before -> after, then the notes."""
        was = f"v{self.before.version}" if self.before else "nothing applied"
        out = [f"version {self.table.version} (active: {was})"]
        for route in dict.fromkeys(m.route for m in self.moves):
            out.append(f"  {route}:")
            out += [f"    {m}" for m in self.moves if m.route == route]
        return out + [f"  note: {n}" for n in self.notes]


class BackwardMoveError(RouteTableError):
    """Raised when a table would move a store back towards legacy and the operator did not allow it."""

    def __init__(self, plan: Plan):
        self.plan = plan
        moves = "; ".join(f"{m.route} {m.store}: {m.before} -> {m.after}" for m in plan.backward)
        super().__init__(f"refused: {len(plan.backward)} store route(s) would move backwards ({moves}); "
                         "if that is meant, run again with --allow-backward")


def store_modes(table: RouteTable | None, stores: Iterable[str]) -> dict[str, dict[str, Mode]]:
    """{route name: {store: mode}} for the given stores."""
    if table is None:
        return {}
    return {r.name: {s: mode_of(r, s) for s in stores} for r in table.routes}


def moves(before: RouteTable | None, after: RouteTable, stores: Iterable[str]) -> list[Move]:
    stores = list(stores)
    old, new = store_modes(before, stores), store_modes(after, stores)
    names = list(dict.fromkeys([*new, *old]))
    return [Move(name, s, old.get(name, {}).get(s, "legacy"), new.get(name, {}).get(s, "legacy"))
            for name in names for s in stores]


def unknown_stores(table: RouteTable, stores: Iterable[str]) -> list[str]:
    known = set(stores)
    return [f"routes[{r.name}].rollout.stores: {s} is not a configured store "
            f"(RETAILBUS.stores: {', '.join(sorted(known)) or 'none'})"
            for r in table.routes if r.rollout for s in r.rollout.stores if s not in known]


def plan(text: str, source: str, before: RouteTable | None, stores: Iterable[str]) -> Plan:
    """The table `text` becomes when applied over `before`, and what it does to `stores`."""
    stores = list(stores)
    table = parse_route_table(text, source)
    problems = unknown_stores(table, stores)
    if problems:
        raise RouteTableError("\n".join(f"{source}: {p}" for p in problems))
    text = numbered(table, text, before.version if before else None, source)
    text, notes = resolve_others(parse_route_table(text, source), text, before, stores)
    after = parse_route_table(text, source)
    return Plan(after, text, before, moves(before, after, stores), notes)


def numbered(table: RouteTable, text: str, active: int | None, source: str) -> str:
    """`text` carrying its version: the file's (checked) or the next one."""
    following = (active or 0) + 1
    if table.version is None:
        return set_version(text, following)
    if active is not None and table.version <= active:
        raise RouteTableError(
            f"{source}: the file is behind: it says version {table.version}, the active table is "
            f"version {active} (written before the last apply or rollback?). Remove its `version:` "
            f"line and apply numbers it ({following}), or write `version: {following}`")
    return text


def resolve_others(table: RouteTable, text: str, before: RouteTable | None,
                   stores: list[str]) -> tuple[str, list[str]]:
    """Write `others:` into every rollout that leaves it out: what those stores run now."""
    notes = []
    for index, route in enumerate(table.routes):
        rollout = route.rollout
        if rollout is None or rollout.others is not None or rollout.percent >= 100:
            continue
        old = before.route_named(route.name) if before else None
        now = {s: mode_of(old, s) for s in stores if not rollout.takes(s)}
        distinct = sorted(set(now.values()), key=RANK.get)
        if len(distinct) > 1:
            runs = ", ".join(f"{s} {m}" for s, m in sorted(now.items()))
            raise RouteTableError(
                f"routes[{route.name}].rollout: the stores outside the rollout run different modes now "
                f"({runs}); say which mode they take with `others: legacy|shadow|bus`")
        if distinct:
            others = distinct[0]
        elif old is not None and old.rollout is not None:
            others = old.rollout.others or "legacy"
        else:
            others = old.mode if old is not None else "legacy"
        text = set_others(text, index, others)
        notes.append(f"routes[{route.name}]: `others` not given: the stores outside the rollout keep "
                     f"what they run now ({others}); written into the applied version")
    return text, notes


# -- small edits that keep the operator's text (and comments) -------------------

def set_version(text: str, version: int, comment: str = "numbered by `retailbus routes apply`") -> str:
    """`text` with `version: N`: the existing value replaced, or a first line added."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    value = next((v for k, v in root.value if k.value == "version"), None) if isinstance(
        root, yaml.MappingNode) else None
    if value is not None:
        return text[:value.start_mark.index] + str(version) + text[value.end_mark.index:]
    if isinstance(root, yaml.MappingNode) and not root.flow_style and root.value:
        at = _line_start(text, root.value[0][0].start_mark.line)
        return text[:at] + f"version: {version}    # {comment}\n" + text[at:]
    return _dumped(text, version=version)


def set_others(text: str, index: int, others: Mode) -> str:
    """`text` with `others: <mode>` in the rollout of the route at `index`."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    routes = next(v for k, v in root.value if k.value == "routes")
    rollout = next(v for k, v in routes.value[index].value if k.value == "rollout")
    if isinstance(rollout, yaml.MappingNode) and rollout.flow_style:
        end = text.rindex("}", 0, rollout.end_mark.index)
        sep = ", " if rollout.value else ""
        edited = text[:end] + f"{sep}others: {others}" + text[end:]
    elif isinstance(rollout, yaml.MappingNode) and rollout.value:
        first = rollout.value[0][0].start_mark
        at = _line_start(text, first.line)
        edited = text[:at] + " " * first.column + f"others: {others}\n" + text[at:]
    else:
        edited = None
    try:
        if edited is not None and parse_route_table(edited).routes[index].rollout.others == others:
            return edited
    except (RouteTableError, IndexError, AttributeError):
        pass
    return _dumped(text, others=(index, others))


def _line_start(text: str, line: int) -> int:
    at = 0
    for _ in range(line):
        at = text.index("\n", at) + 1
    return at


def _dumped(text: str, version: int | None = None, others: tuple[int, Mode] | None = None) -> str:
    """The last resort for a layout the edits above do not handle: the table re-written."""
    data = yaml.safe_load(text)
    if version is not None:
        data = {"version": version, **{k: v for k, v in data.items() if k != "version"}}
    if others is not None:
        data["routes"][others[0]]["rollout"]["others"] = others[1]
    return yaml.safe_dump(data, sort_keys=False)
