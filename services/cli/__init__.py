"""`retailbus`: one command line for ops and developers."""
from __future__ import annotations

import json
import sys
import warnings

# nameko 2.14 runs on eventlet; its deprecation notice is not news to an operator.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import click  # noqa: E402

from contracts import registry  # noqa: E402
from contracts.errors import ContractError
from services.cli.agent import agent
from services.cli.broker import broker
from services.cli.cases import cases
from services.cli.customers import customers
from services.cli.dlq import dlq
from services.cli.files import files
from services.cli.loyalty import loyalty
from services.cli.processes import processes
from services.cli.orders import orders
from services.cli.reconcile import reconcile
from services.cli.routes import routes
from services.cli.trace import trace
from bus.settings import ConfigError


@click.group()
def main():
    """retailbus: a lightweight message bus that strangles a legacy retail ESB."""


@main.group()
def contracts():
    """The canonical business messages."""


@contracts.command("list")
def contracts_list():
    """Every message type with the model that validates it."""
    for name in registry.types():
        model = registry.model_for(name)
        doc = (model.__doc__ or "").strip().splitlines()
        click.echo(f"{name:<28} {model.__name__:<26} {doc[0] if doc else ''}")


@contracts.command("schema")
@click.argument("type_name")
def contracts_schema(type_name):
    """The JSON Schema of TYPE_NAME (e.g. pos.sale.v1)."""
    try:
        click.echo(json.dumps(registry.json_schema(type_name), indent=2))
    except ContractError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--config", "config_path", default="config/bus.yaml", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--keep-broker", is_flag=True, help="leave the managed broker running on exit")
def up(config_path, keep_broker):
    """Run the broker (if needed), the demo legacy ERP, every service and store agent."""
    from services.up import Supervisor

    try:
        sys.exit(Supervisor.from_config(config_path, keep_broker=keep_broker).run())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--rate", default=20.0, show_default=True, help="POS sales per second, both stores together")
@click.option("--phase-seconds", default=15.0, show_default=True, help="how long each routing step runs")
@click.option("--keep", is_flag=True, help="keep the demo's folder (logs, legacy DB) afterwards")
def demo(rate, phase_seconds, keep):
    """Watch the sales route move legacy -> shadow -> bus on a throw-away estate."""
    from demo.strangler import run

    sys.exit(run(rate, phase_seconds, keep))


main.add_command(broker)
main.add_command(agent)
main.add_command(routes)
main.add_command(files)
main.add_command(reconcile)
main.add_command(trace)
main.add_command(dlq)
main.add_command(loyalty)
main.add_command(processes)
main.add_command(orders)
main.add_command(customers)
main.add_command(cases)

if __name__ == "__main__":
    main()
