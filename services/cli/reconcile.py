"""`retailbus reconcile --date D [--store S] [--json]`: did every store's day reach the ERP?

Holds the control totals the store agents sent (kept by the reconcile service)
against the legacy ERP database and the loyalty points files, and (where the
loyalty service has a database) the loyalty platform's ledger against the loyalty
service's bookings and the ERP's loyalty postings, and names every missing,
duplicated, unexpected or mismatched transaction by POS id. Exit 0:
the day reconciles; 1: any difference; 2: bad input or configuration.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from bus.settings import DEFAULT_CONFIG, ConfigError, load_config


class BadInput(click.ClickException):
    exit_code = 2


def _store(ctx, param, value):
    if value is not None and not re.fullmatch(r"[A-Z0-9]{1,8}", value):
        raise click.BadParameter(f"{value!r} is not a store id (1-8 of A-Z, 0-9)")
    return value


@click.command()
@click.option("--date", "day", required=True, type=click.DateTime(formats=["%Y-%m-%d"]),
              help="the business day, YYYY-MM-DD")
@click.option("--store", "store_id", callback=_store, help="only this store (default: every store)")
@click.option("--json", "as_json", is_flag=True, help="the reports as JSON")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True)
def reconcile(day, store_id, as_json, config_path):
    """Agent control totals vs the legacy ERP vs the loyalty points file and platform, for one business day."""
    from services.reconcile.run import Estate, reconcile_day

    try:
        estate = Estate.from_config(load_config(config_path), config_path, require_legacy=True)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    try:
        reports = reconcile_day(estate, day.date(), store_id)
    finally:
        estate.dispose()
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in reports], indent=2))
    else:
        from services.reconcile.compare import render
        for report in reports:
            click.echo(render(report))
        gap = sum(r.gap for r in reports)
        click.echo(f"{len(reports)} store(s), {'no differences' if gap == 0 else f'{gap} difference(s)'}")
    sys.exit(1 if any(r.gap for r in reports) else 0)
