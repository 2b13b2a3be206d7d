"""What the legacy batch jobs do with their files, the way they always did.

The CRM writes `customers_<day>.csv` then a `.done` marker; the warehouse
writes `stock_<day>.dat.tmp` then renames it; the loyalty job reads every
`POINTS_*.dat` that has its `.done` marker and checks the trailer.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path


HEADER = ["customer_id", "name", "email", "phone", "loyalty_card", "updated_at", "consent_marketing_email",
          "consent_sms", "consent_data_sharing"]


def customer_rows(n: int, start: int = 1):
    for i in range(start, start + n):
        yield [f"C{i:08d}", f"Customer {i}", f"c{i}@example.com", f"+49 30 {i:07d}",
               f"LC{i:010d}", "2026-11-27T06:00:00+00:00", "Y", "N", "N"]


def write_customer_export(path: Path, rows, marker: bool = True, delay: float = 0.0,
                          trailer: bool = True) -> int:
    """Write the export (slowly when `delay` > 0), then its trailer and marker."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for row in rows:
            w.writerow(row)
            n += 1
            if delay:
                f.flush()
                time.sleep(delay)
        if trailer:
            w.writerow(["TRL", n] + [""] * (len(HEADER) - 2))
    if marker:
        Path(str(path) + ".done").touch()
    return n


def stock_line(store: str, sku: str, on_hand: int, at: str = "2026-11-27T06:00:00+00:00") -> str:
    return f"{store:<8}{sku:<20}{on_hand:09d}{at}"


def write_stock_snapshot(path: Path, lines: list[str], count: int | None = None,
                         total: int | None = None) -> None:
    """Write under a temp name, then rename: the warehouse job's completion protocol."""
    if count is None:
        count = len(lines)
    if total is None:
        total = sum(int(line[28:37]) for line in lines if len(line) >= 37 and line[28:37].strip().isdigit())
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("HDR STOCK SNAPSHOT\n" + "".join(l + "\n" for l in lines)
                   + f"TRL{count:09d}{total:015d}\n")
    os.replace(tmp, path)


def read_points_files(folder: Path) -> list[str]:
    """The loyalty job: records of every complete points file, trailer-checked."""
    records = []
    for path in sorted(folder.glob("POINTS_*.dat")):
        if not Path(str(path) + ".done").exists():
            continue
        lines = path.read_text().splitlines()
        body, trailer = lines[1:-1], lines[-1]
        if not trailer.startswith("T") or int(trailer[1:10]) != len(body):
            raise ValueError(f"{path.name}: trailer count does not match")
        if int(trailer[10:25]) != sum(int(line[77:86]) for line in body):
            raise ValueError(f"{path.name}: trailer points total does not match")
        records.extend(body)
    return records
