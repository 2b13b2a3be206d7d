"""`python -m bus.runner [nameko run's arguments]`: `nameko run`, with eventlet's
psycopg2 patch made when psycopg2 is first imported instead of up front.

`nameko run` calls `eventlet.monkey_patch()`, which imports psycopg2 (libpq and
its C module, ~5 MiB) into every service process so that its queries yield to
the hub. Most bus services never talk to PostgreSQL (the files service keeps
its ledger in SQLite); the ones that do import psycopg2 through SQLAlchemy when
they first connect, and get the same green wait callback then, before any
connection exists. Everything else is nameko's own `run` command.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


class _GreenPsycopgOnImport(importlib.abc.MetaPathFinder):
    """Makes psycopg2 green right after it is imported (eventlet's own patch)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "psycopg2":
            return None
        sys.meta_path.remove(self)  # once; and lets find_spec below see the real finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            from eventlet.support import psycopg2_patcher
            psycopg2_patcher.make_psycopg_green()

        spec.loader.exec_module = exec_then_patch
        return spec


def monkey_patch() -> None:
    """`eventlet.monkey_patch()` as `nameko run` calls it, psycopg2 patched on import.
    Must run before anything imports sockets, threads or psycopg2."""
    with warnings.catch_warnings():  # eventlet's deprecation notice is not news to an operator (services/cli/__init__.py)
        warnings.simplefilter("ignore")
        import eventlet

    eventlet.monkey_patch(psycopg=False)
    if "psycopg2" in sys.modules:
        from eventlet.support import psycopg2_patcher
        psycopg2_patcher.make_psycopg_green()
    elif not any(isinstance(f, _GreenPsycopgOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _GreenPsycopgOnImport())


def main(argv: list[str] | None = None) -> None:
    monkey_patch()
    from nameko.cli.main import setup_parser, setup_yaml_parser
    from nameko.cli.run import main as run
    from nameko.exceptions import CommandError, ConfigurationError

    # nameko.cli.main.main for the `run` command, without Run.main's monkey_patch()
    args = setup_parser().parse_args(["run", *(sys.argv[1:] if argv is None else argv)])
    setup_yaml_parser()
    try:
        run(args)
    except (CommandError, ConfigurationError) as exc:
        print(f"Error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
