"""`retailbus processes list|show ID`: process instances (bus/process) and their history.

The instances live in each process service's own database: the services of
`RETAILBUS.services` are looked at (without starting them) for their process
managers, and each one's database (its config key in bus.yaml) is read, never written.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings


def _databases(config_path: Path) -> list[tuple[object, str]]:
    """(process definition, DSN) of every process manager of the configured services."""
    from bus.process import ProcessManager
    from services.broker.users import service_class

    try:
        config = load_config(config_path)
        settings = retailbus_settings(config, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    found = []
    for service in settings.services.values():
        for value in vars(service_class(service.module)).values():
            if isinstance(value, ProcessManager) and config.get(value.config_key):
                found.append((value.definition, settings.absolute_dsn(config[value.config_key])))
    return found


def _read(config_path: Path, read) -> list:
    """`read(conn, definition)` on each process database that exists; the rows together."""
    from sqlalchemy import create_engine, inspect

    from bus.process.store import INSTANCES

    rows = []
    for definition, dsn in _databases(config_path):
        if dsn.startswith("sqlite:///") and not Path(dsn.removeprefix("sqlite:///")).exists():
            continue  # the service never ran
        engine = create_engine(dsn)
        try:
            with engine.connect() as conn:
                if inspect(conn).has_table(INSTANCES.name):
                    rows += read(conn, definition)
        finally:
            engine.dispose()
    return rows


@click.group()
def processes():
    """Process instances (return to refund, ...): their state and history."""


@processes.command("list")
@click.option("--process", "name", help="only this process (e.g. return_to_refund)")
@click.option("--state", type=click.Choice(["running", "compensating", "completed", "failed"]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per instance")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_CONFIG,
              show_default=True)
def list_(name, state, limit, as_json, config_path):
    """The latest instances, newest first."""
    from sqlalchemy import select

    from bus.process.store import INSTANCES

    def read(conn, definition):
        if name and definition.name != name:
            return []
        c = INSTANCES.c
        query = select(INSTANCES).where(c.PROCESS == definition.name)
        if state:
            query = query.where(c.STATE == state)
        return list(conn.execute(query.order_by(c.UPDATED_AT.desc()).limit(limit)))

    rows = sorted(_read(config_path, read), key=lambda r: r.UPDATED_AT, reverse=True)[:limit]
    for row in rows:
        steps = json.loads(row.STEPS)
        step = f"{row.STEP + 1}/{len(steps)}"
        if as_json:
            click.echo(json.dumps({"process_id": row.PROCESS_ID, "process": row.PROCESS, "key": row.CORR_KEY,
                                   "state": row.STATE, "step": step, "round": row.ROUND,
                                   "updated_at": row.UPDATED_AT}))
        else:
            click.echo(f"{row.PROCESS_ID}  {row.PROCESS:<18} {row.CORR_KEY:<28} {row.STATE:<12} step {step:<5} "
                       f"{row.UPDATED_AT[:19]}")
    if not rows and not as_json:
        click.echo("no process instances")


@processes.command("show")
@click.argument("process_id")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_CONFIG,
              show_default=True)
def show(process_id, config_path):
    """One instance: its state, each step's, and its history (exit 1 when unknown)."""
    from sqlalchemy import select

    from bus.process.store import HISTORY, INSTANCES

    def read(conn, definition):
        row = conn.execute(select(INSTANCES).where(INSTANCES.c.PROCESS_ID == process_id,
                                                   INSTANCES.c.PROCESS == definition.name)).first()
        if row is None:
            return []
        history = list(conn.execute(select(HISTORY).where(HISTORY.c.PROCESS_ID == process_id)
                                    .order_by(HISTORY.c.ID)))
        return [(definition, row, history)]

    found = _read(config_path, read)
    if not found:
        click.echo(f"Error: no process instance {process_id!r} (a completed one is pruned "
                   "RETAILBUS.retention.process_days after its last change)", err=True)
        raise SystemExit(1)
    definition, row, history = found[0]
    click.echo(f"{row.PROCESS} {row.PROCESS_ID}  key {row.CORR_KEY}  state {row.STATE}  round {row.ROUND}  "
               f"created {row.CREATED_AT[:19]}  updated {row.UPDATED_AT[:19]}")
    for n, (step, state) in enumerate(zip(definition.steps, json.loads(row.STEPS)), start=1):
        reason = f"  ({state['reason']})" if state.get("reason") else ""
        click.echo(f"  {n}. {step.name:<16} {state['status']:<16} sent {state.get('attempts', 0)}x{reason}")
    click.echo("history:")
    for h in history:
        detail = json.loads(h.DETAIL) if h.DETAIL else {}
        words = " ".join(f"{k}={v}" for k, v in detail.items())
        click.echo(f"  {h.AT[:23]}  {h.STEP or '-':<16} {h.WHAT:<18} {words}".rstrip())
