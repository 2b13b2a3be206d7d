"""`retailbus customers show ID|EMAIL|CARD` and `retailbus customers validate [FILE]`.

`show` prints the golden record: each attribute's value, the system record and
time it came from and the rule that chose it, the records linked to it, and its
history (changes, links, merges, steward cases). It reads the customer hub's
database (CUSTOMERS_DB_URI of bus.yaml). `validate` checks a customers.yaml as
the service would at start.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             default=DEFAULT_CONFIG, show_default=True)


@click.group()
def customers():
    """The customer hub: golden records (config/customers.yaml, docs/customers.md)."""


def _settings(config_path: Path):
    try:
        config = load_config(config_path)
        return config, retailbus_settings(config, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@customers.command()
@click.argument("name", metavar="ID|EMAIL|CARD")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of tables")
@config_option
def show(name, as_json, config_path):
    """The golden record NAME leads to: a golden id, a record id of any system, an e-mail
    address, a phone number or a loyalty card. Exit 1 if there is none."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from services.customers import lookup
    from services.customers.config import CustomersConfigError, load

    config, settings = _settings(config_path)
    try:
        rules = load(settings.path(settings.customers.rules))
    except CustomersConfigError as exc:
        raise click.ClickException(str(exc)) from None
    dsn = settings.absolute_dsn(config.get("CUSTOMERS_DB_URI") or "sqlite:///var/customers.db")
    if dsn.startswith("sqlite:///") and not Path(dsn.removeprefix("sqlite:///")).exists():
        raise click.ClickException(f"no customer hub database at {dsn} (is the customers service running?)")
    engine = create_engine(dsn)
    try:
        with engine.connect() as conn:
            views = [lookup.view(conn, golden) for golden in lookup.find(conn, rules, name)]
    except SQLAlchemyError as exc:
        raise click.ClickException(f"cannot read {engine.url!r}: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()
    views = list({v.golden_id: v for v in views}.values())
    if not views:
        click.echo(f"Error: no customer is known by {name!r}", err=True)
        raise SystemExit(1)
    for view in views:
        if as_json:
            click.echo(json.dumps(view.__dict__, default=str))
        else:
            click.echo(_text(view, lookup.describe))


def _text(view, describe) -> str:
    lines = [f"golden {view.golden_id} (version {view.version}, {view.status})"
             + (f", found by {', '.join(view.retired)}, merged into it" if view.retired else ""),
             f"records: {', '.join(view.records)}", ""]
    lines += _table(("ATTRIBUTE", "VALUE", "SOURCE", "SOURCE TIME (UTC)", "RULE"),
                    [(a, json.dumps(value), f"{origin} ({record})", at.replace("T", " ")[:23], rule)
                     for a, value, origin, record, at, rule in view.attributes])
    lines += ["", "HISTORY"]
    lines += _table(("TIME (UTC)", "WHAT", "ORIGIN", "RECORD", "DETAIL"),
                    [(at.replace("T", " ")[:23], kind, origin, record or "-", describe(kind, detail))
                     for at, kind, origin, record, detail in view.history])
    return "\n".join(lines)


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1])).rstrip()
            for r in [header, *rows]]


@customers.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@config_option
def validate(path, config_path):
    """Check PATH (default: RETAILBUS.customers.rules) as the customers service would; exit 1 naming
    each problem's line."""
    from services.customers.config import CustomersConfigError, load

    if path is None:
        _, settings = _settings(config_path)
        path = settings.path(settings.customers.rules)
    try:
        load(path)
    except CustomersConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    click.echo(f"{path}: valid")
