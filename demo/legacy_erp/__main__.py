"""``python -m demo.legacy_erp init|serve``: run the simulated legacy ERP.

Every option can also come from the environment (LEGACY_ERP_DB,
LEGACY_ERP_LATENCY_MS, LEGACY_ERP_FAIL_RATE, ...) so demo scripts and chaos
tests can slow down or break the ERP without changing its command line.
"""

import click

from .schema import create_schema, engine_for, seed_demo_data
from .server import make_server, serve_until_signalled

_db_option = click.option(
    "--db", "dsn", required=True, envvar="LEGACY_ERP_DB",
    help="SQLAlchemy URL, e.g. sqlite:////abs/erp.db or postgresql+psycopg2://...",
)


@click.group()
def cli():
    """The simulated legacy ERP that retailbus strangles."""


@cli.command()
@_db_option
@click.option("--seed", is_flag=True, help="Add demo stock (S001, S002 x 100001..100020) and customers.")
def init(dsn: str, seed: bool):
    """Create the legacy schema (idempotent)."""
    engine = engine_for(dsn)
    try:
        create_schema(engine)
        if seed:
            with engine.begin() as conn:
                seed_demo_data(conn)
    finally:
        engine.dispose()
    click.echo(f"legacy ERP schema ready{' and seeded' if seed else ''}", err=True)


@cli.command()
@_db_option
@click.option("--host", default="127.0.0.1", show_default=True, envvar="LEGACY_ERP_HOST")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(0, 65535),
              envvar="LEGACY_ERP_PORT", help="0 picks a free port (logged at start).")
@click.option("--latency-ms", default=0, show_default=True, type=click.IntRange(min=0),
              envvar="LEGACY_ERP_LATENCY_MS", help="Sleep this long before answering.")
@click.option("--fail-rate", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              envvar="LEGACY_ERP_FAIL_RATE", help="Fraction of POSTs answered 503 without writing.")
@click.option("--init", "init_schema", is_flag=True, help="Create the schema first.")
def serve(dsn: str, host: str, port: int, latency_ms: int, fail_rate: float, init_schema: bool):
    """Serve the ERP HTTP API until SIGTERM/SIGINT."""
    server = make_server(dsn, host, port, latency_ms=latency_ms,
                         fail_rate=fail_rate, init=init_schema)
    serve_until_signalled(server)


if __name__ == "__main__":
    cli(prog_name="python -m demo.legacy_erp")
