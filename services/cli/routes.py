"""`retailbus routes validate|diff|apply|status|history|rollback`: migrate routes by config.

Every apply is validated, audited (who, when, why, diff) and broadcast to the
store agents; a rollback is a new apply of an earlier table, so the audit log
tells the whole story.
"""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import click
from amqp.exceptions import AMQPError

from routing.control import RouteRegistry, apply_table, planned, rollback_text, start_up_table
from routing.route_plan import BackwardMoveError, Plan
from routing.route_table import RouteTableError, load_route_table
from services.broker.node import resolve_amqp_uri
from bus.settings import DEFAULT_CONFIG, ConfigError, RetailbusSettings, load_config, retailbus_settings

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             default=DEFAULT_CONFIG, show_default=True)


def _load(config_path: Path) -> tuple[dict, RetailbusSettings]:
    try:
        config = load_config(config_path)
        return config, retailbus_settings(config, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _registry(settings: RetailbusSettings) -> RouteRegistry:
    return RouteRegistry(settings.path(settings.routes_state))


def _fail(exc: Exception):
    raise click.ClickException(str(exc)) from None


@click.group()
def routes():
    """Strangle POS-to-ERP calls route by route (config/routes.yaml)."""


def _stores(settings: RetailbusSettings) -> list[str]:
    return [s.id for s in settings.stores]


def agent_table(http: str) -> dict | None:
    """What an agent runs: {"store", "version", "table"} (GET /routes/table), None if silent."""
    try:
        with urllib.request.urlopen(f"http://{http}/routes/table", timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def baseline(settings: RetailbusSettings) -> tuple[str, str] | None:
    """(text, source) of the table the agents run when nothing has been applied yet:
    the newest an agent reports, else the configured start-up file."""
    running = [t for t in (agent_table(s.http) for s in settings.stores) if t and t.get("table")]
    if running:
        newest = max(running, key=lambda t: t.get("version") or 0)
        return newest["table"], f"the table store {newest['store']} runs"
    path = settings.path(settings.routes_file)
    return (path.read_text(), str(path)) if path.exists() else None


def _plan(settings: RetailbusSettings, file: Path) -> tuple[Plan, tuple[str, str] | None]:
    registry = _registry(settings)
    start = None if registry.active() is not None else baseline(settings)
    text = file.read_text() if file.exists() else _fail(f"{file}: no such file")
    return planned(registry, text, str(file), _stores(settings),
                   start_up_table(*start)[0] if start else None), start


def _print_plan(todo: Plan) -> None:
    for line in todo.lines():
        click.echo(line)
    if todo.backward:
        click.echo(f"{len(todo.backward)} store route(s) move backwards (towards legacy)")


@routes.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"also check FILE against the stores and the active table of this bus.yaml "
                   f"(default {DEFAULT_CONFIG}, when it exists)")
def validate(file, config_path):
    """Check FILE: errors name the line and the reason; with a configuration, also the
    stores it names and whether it is behind the active table."""
    try:
        table = load_route_table(file)
    except RouteTableError as exc:
        _fail(exc)
    if config_path is None and not DEFAULT_CONFIG.exists():
        click.echo(f"{file}: valid, {len(table.routes)} routes (not checked against a configuration: "
                   f"no {DEFAULT_CONFIG})")
        return
    _, settings = _load(config_path or DEFAULT_CONFIG)
    try:
        todo, _ = _plan(settings, file)
    except RouteTableError as exc:
        _fail(exc)
    click.echo(f"{file}: valid, {len(table.routes)} routes; applied now it would be:")
    _print_plan(todo)


@routes.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--text", "show_text", is_flag=True, help="also the line diff of the table text")
@config_option
def diff(file, show_text, config_path):
    """Every store's mode per route, before -> after, if FILE were applied."""
    _, settings = _load(config_path)
    try:
        todo, _ = _plan(settings, file)
    except RouteTableError as exc:
        _fail(exc)
    _print_plan(todo)
    if show_text:
        lines = _registry(settings).diff(todo.text, str(file))
        click.echo("\n".join(lines) if lines else "no change in the text")


backward_option = click.option(
    "--allow-backward", "--yes", "allow_backward", is_flag=True,
    help="apply even when a store moves backwards (bus -> shadow -> legacy)")


@routes.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reason", required=True, help="why: recorded in the audit log")
@backward_option
@config_option
def apply(file, reason, allow_backward, config_path):
    """Validate, audit and broadcast FILE to every store agent; the version is the
    file's (when given, it must be ahead of the active one) or the next."""
    config, settings = _load(config_path)
    try:
        todo, start = _plan(settings, file)
        _print_plan(todo)
        if todo.backward and not allow_backward:
            raise BackwardMoveError(todo)
        applied = apply_table(_registry(settings), resolve_amqp_uri(config, settings), file.read_text(),
                              str(file), reason, _stores(settings), allow_backward=allow_backward,
                              baseline=start)
    except RouteTableError as exc:
        _fail(exc)
    except (OSError, AMQPError) as exc:
        _fail(f"cannot broadcast the table ({exc}); nothing was applied")
    click.echo(f"applied version {applied.version} (was {applied.previous})")
    if not applied.delivered:
        click.echo("note: no store agent queue is bound yet; agents start from their saved table")


@routes.command()
@click.argument("version", type=int, required=False)
@click.option("--reason", default="rollback", show_default=True)
@config_option
def rollback(version, reason, config_path):
    """Re-apply VERSION (default: the one before the active) as a new version."""
    config, settings = _load(config_path)
    registry = _registry(settings)
    try:
        target, text = rollback_text(registry, version)
        applied = apply_table(registry, resolve_amqp_uri(config, settings), text, f"rollback to v{target}",
                              reason, _stores(settings), action="rollback", allow_backward=True,
                              to_version=target)
    except RouteTableError as exc:
        _fail(exc)
    except (OSError, AMQPError) as exc:
        _fail(f"cannot broadcast the table ({exc}); nothing was rolled back")
    for route in dict.fromkeys(m.route for m in applied.moves):
        click.echo(f"  {route}: " + "; ".join(str(m) for m in applied.moves if m.route == route))
    click.echo(f"rolled back to v{target} as version {applied.version}")


HISTORY = ("VERSION", "TIME (UTC)", "ACTION", "WHO", "RESTORES", "REASON")


@routes.command()
@config_option
def history(config_path):
    """Every table applied: when, by whom, what a rollback restored, why."""
    _, settings = _load(config_path)
    rows = [(f"v{e['version']}", e["time"][:19].replace("T", " "), e["action"], e["who"] or "-",
             f"v{e['to_version']}" if e.get("to_version") else
             (f"{e['route']}: earlier mode" if e.get("route") else "-"), e["reason"])
            for e in _registry(settings).audit()]
    if not rows:
        click.echo("no route table applied yet")
        return
    widths = [max(len(r[i]) for r in [HISTORY, *rows]) for i in range(len(HISTORY) - 1)]
    for row in [HISTORY, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def agent_health(http: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{http}/healthz", timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


@routes.command()
@click.argument("route")
@click.option("--limit", default=20, show_default=True, help="per agent, newest last")
@config_option
def mismatches(route, limit, config_path):
    """Shadow mismatches of ROUTE kept by each agent: the differing fields, both sides."""
    _, settings = _load(config_path)
    found = 0
    for store in settings.stores:
        try:
            path = f"/routes/mismatches?route={urllib.parse.quote(route)}&limit={limit}"
            request = urllib.request.Request(f"http://{store.http}{path}", headers=_ops_signed(settings, store, path))
            with urllib.request.urlopen(request, timeout=5) as response:
                records = json.loads(response.read())["mismatches"]
        except (OSError, ValueError, KeyError):
            click.echo(f"{store.id}: silent")
            continue
        for r in records:
            found += 1
            click.echo(f"{store.id} {r['time'][:19]} {r['ref']}: " + ", ".join(
                f"{d['field']} bus={d['bus']!r} legacy={d['legacy']!r}" for d in r["diffs"]))
    click.echo(f"{found} mismatches on {route}")


def _ops_signed(settings: RetailbusSettings, store, path: str) -> dict:
    """The signature of a GET with the store's ops key (made on first use, 0600 beside its
    terminal keys): shadow mismatches carry loyalty cards and customer ids, so the agent
    shows them to that key only."""
    from routing.edge_auth import TerminalKeys, signed_headers
    from routing.store_agent import OPS_TERMINAL

    keys = TerminalKeys(settings.outbox_path(store).parent / "terminal_keys.json")
    key = keys.get(OPS_TERMINAL) or bytes.fromhex(keys.add(OPS_TERMINAL))
    return signed_headers(OPS_TERMINAL, key, "GET", path, b"")


def _says(route) -> str:
    """What the table says for a route, in words."""
    rollout = route.rollout
    if rollout is None:
        return f"{route.mode} for every store"
    who = ", ".join(rollout.stores)
    share = f"{rollout.percent:g}% of the other stores by hash" if rollout.percent else ""
    taking = " and ".join(p for p in (who, share) if p) or "no store"
    return f"{route.mode} for {taking}; others {rollout.others or 'legacy (unresolved)'}"


def _parity(health: dict, route: str) -> str:
    rate = (health.get("shadow_parity") or {}).get(route)
    compared = (health.get("shadow_compared") or {}).get(route)
    if rate is None or not compared:
        return ""
    counts = (health.get("routes") or {}).get(route) or {}
    return (f"parity {rate:.1%} of {compared} compared ({counts.get('shadow_mismatch', 0)} mismatches, "
            f"{counts.get('shadow_error', 0)} errors)")


@routes.command()
@config_option
def status(config_path):
    """What the active table says per route, each agent's version and mode per route,
    its traffic over the last minute and its shadow parity (rate and sample size)."""
    _, settings = _load(config_path)
    try:
        table = _registry(settings).active()
    except RouteTableError as exc:
        _fail(exc)
    if table is None:
        click.echo("no route table applied yet (agents run their saved table or config/routes.yaml)")
    else:
        click.echo(f"active version {table.version}")
        width = max(len(r.name) for r in table.routes) if table.routes else 5
        for r in table.routes:
            click.echo(f"  {r.name:<{width}}  {r.message:<20} {_says(r)}")
    healths = {store.id: agent_health(store.http) for store in settings.stores}
    names = list(dict.fromkeys([*(r.name for r in (table.routes if table else ())),
                                *(n for h in healths.values() if h for n in h.get("route_modes") or {})]))
    header = ["AGENT", "ADDRESS", "VERSION", *(n.upper() for n in names)]
    rows = []
    for store in settings.stores:
        health = healths[store.id]
        if health is None:
            rows.append([store.id, store.http, "silent", *("-" for _ in names)])
            continue
        version = health.get("route_table_version")
        stale = " (stale)" if table and version != table.version else ""
        modes = health.get("route_modes") or {}
        rows.append([store.id, store.http, f"v{version}{stale}", *(modes.get(n, "legacy") for n in names)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    click.echo("agents:")
    for row in [header, *rows]:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for store in settings.stores:
        health = healths[store.id]
        if health is None:
            continue
        window = health.get("routes_window") or {}
        for name in names:
            traffic = " ".join(f"{k}={v}" for k, v in sorted((window.get(name) or {}).items())) or "none"
            parity = _parity(health, name)
            click.echo(f"  {store.id} {name}: last 60s {traffic}" + (f"; shadow {parity}" if parity else ""))
