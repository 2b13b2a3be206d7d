"""`python -m demo.batch customers|stock`: drop a demo file the way the legacy job does.

    python -m demo.batch customers --count 100 --to var/drops/customers
    python -m demo.batch stock --store S001 --on-hand 40 --to var/drops/stock

The customer export is written then marked `.done` (the CRM's protocol), the
stock snapshot written under `.tmp` then renamed (the warehouse's), so a
running `retailbus up` takes each file as soon as it is complete.
"""
from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from demo.batch.jobs import customer_rows, stock_line, write_customer_export, write_stock_snapshot
from demo.legacy_erp.schema import DEMO_SKUS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.batch", description=__doc__.split("\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    customers = kinds.add_parser("customers", help="the CRM's customer export (CSV + .done marker)")
    customers.add_argument("--count", type=int, default=100)
    customers.add_argument("--start", type=int, default=1, help="first customer number (C00000001)")
    customers.add_argument("--to", type=Path, default=Path("var/drops/customers"))
    stock = kinds.add_parser("stock", help="the warehouse's stock snapshot (fixed width, .tmp then rename)")
    stock.add_argument("--store", default="S001")
    stock.add_argument("--on-hand", type=int, default=40, help="the level every demo SKU gets")
    stock.add_argument("--to", type=Path, default=Path("var/drops/stock"))
    args = parser.parse_args(argv)

    args.to.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    if args.kind == "customers":
        path = args.to / f"customers_{stamp}.csv"
        n = write_customer_export(path, customer_rows(args.count, args.start))
        print(f"{path}: {n} customers (C{args.start:08d}..), marked done")
    else:
        path = args.to / f"stock_{stamp}.dat"
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_stock_snapshot(path, [stock_line(args.store, sku, args.on_hand, at) for sku in DEMO_SKUS])
        print(f"{path}: {len(DEMO_SKUS)} SKUs of store {args.store} at {args.on_hand}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
