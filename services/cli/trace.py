"""`retailbus trace ID`: the path of a message (or a file row) from the journal."""
from __future__ import annotations

import json
from pathlib import Path

import click

from bus.settings import ConfigError, load_config, retailbus_settings


@click.command()
@click.argument("name", metavar="ID")
@click.option("--config", "config_path", default="config/bus.yaml", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per hop instead of a table")
def trace(name, config_path, as_json):
    """Every hop of ID in time order: ID is a message id, a correlation id, a POS
    transaction id, a customer id or a file row key (`<sha256>:<row>`)."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.journal import store
    from services.journal.trace import table, trace as assemble

    try:
        settings = retailbus_settings(load_config(config_path), config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    dsn = settings.absolute_dsn(settings.journal.dsn)
    if dsn.startswith("sqlite:///") and not Path(dsn.removeprefix("sqlite:///")).exists():
        raise click.ClickException(f"no journal at {dsn} (is the journal service running?)")
    engine = store.open_engine(dsn, create=False)
    try:
        with engine.connect() as conn:
            hops = assemble(conn, name)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"cannot read the journal {engine.url!r}: {exc.__class__.__name__}: "
                                   f"{str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()
    if not hops:
        click.echo(f"Error: nothing is known about {name!r} in the journal ({engine.url!r})", err=True)
        raise SystemExit(1)
    if as_json:
        for hop in hops:
            click.echo(json.dumps(hop.as_json(), default=str))
    else:
        click.echo(table(hops))
