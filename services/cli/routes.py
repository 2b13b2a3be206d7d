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

from routing.control import RouteRegistry, apply_table, rollback_text
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


@routes.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def validate(file):
    """Check FILE; errors name the line and the reason."""
    try:
        table = load_route_table(file)
    except RouteTableError as exc:
        _fail(exc)
    click.echo(f"{file}: valid, version {table.version}, {len(table.routes)} routes")


@routes.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@config_option
def diff(file, config_path):
    """What applying FILE would change against the active table."""
    _, settings = _load(config_path)
    try:
        load_route_table(file)
        lines = _registry(settings).diff(file.read_text(), str(file))
    except RouteTableError as exc:
        _fail(exc)
    click.echo("\n".join(lines) if lines else "no change")


@routes.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reason", required=True, help="why: recorded in the audit log")
@config_option
def apply(file, reason, config_path):
    """Validate, audit and broadcast FILE to every store agent."""
    config, settings = _load(config_path)
    try:
        applied = apply_table(_registry(settings), resolve_amqp_uri(config, settings),
                              file.read_text(), str(file), reason)
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
        applied = apply_table(registry, resolve_amqp_uri(config, settings), text,
                              f"rollback to v{target}", reason, action="rollback", to_version=target)
    except RouteTableError as exc:
        _fail(exc)
    except (OSError, AMQPError) as exc:
        _fail(f"cannot broadcast the table ({exc}); nothing was rolled back")
    click.echo(f"rolled back to v{target} as version {applied.version}")


@routes.command()
@config_option
def history(config_path):
    """Every apply and rollback: when, who, why."""
    _, settings = _load(config_path)
    for entry in _registry(settings).audit():
        click.echo(f"v{entry['version']:<4} {entry['time'][:19]} {entry['action']:<9} "
                   f"{entry['who']:<12} {entry['reason']}")


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
            url = f"http://{store.http}/routes/mismatches?route={urllib.parse.quote(route)}&limit={limit}"
            with urllib.request.urlopen(url, timeout=5) as response:
                records = json.loads(response.read())["mismatches"]
        except (OSError, ValueError, KeyError):
            click.echo(f"{store.id}: silent")
            continue
        for r in records:
            found += 1
            click.echo(f"{store.id} {r['time'][:19]} {r['ref']}: " + ", ".join(
                f"{d['field']} bus={d['bus']!r} legacy={d['legacy']!r}" for d in r["diffs"]))
    click.echo(f"{found} mismatches on {route}")


@routes.command()
@config_option
def status(config_path):
    """Each route's mode and rollout, and which agents run which version."""
    _, settings = _load(config_path)
    try:
        table = _registry(settings).active()
    except RouteTableError as exc:
        _fail(exc)
    if table is None:
        click.echo("no route table applied yet (agents run their saved table or config/routes.yaml)")
    else:
        click.echo(f"active version {table.version}")
        for r in table.routes:
            rollout = (f" stores={','.join(r.rollout.stores) or '-'} percent={r.rollout.percent:g}"
                       if r.rollout else "")
            click.echo(f"  {r.name:<10} {r.message:<20} {r.mode:<7}{rollout}")
    click.echo("agents:")
    for store in settings.stores:
        health = agent_health(store.http)
        if health is None:
            state = "silent"
        else:
            version = health.get("route_table_version")
            state = f"v{version}" + (" (stale)" if table and version != table.version else "")
            window = health.get("routes_window") or {}
            for name, stats in sorted((health.get("routes") or {}).items()):
                state += f"\n      {name}: " + " ".join(f"{k}={v}" for k, v in sorted(stats.items()))
                state += "\n        last 60s: " + " ".join(
                    f"{k}={v}" for k, v in sorted((window.get(name) or {}).items()))
        click.echo(f"  {store.id:<8} {store.http:<22} {state}")
