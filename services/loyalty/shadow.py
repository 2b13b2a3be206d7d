"""Shadow accrual: the legacy points file's figure against the platform's rules, per sale.

In `shadow` mode the points file still earns (the files service writes its line)
and the loyalty service computes what the platform would book and compares the
two field by field: `points` (what the member gets) and `basis_minor` (the amount
that earned: the file takes the sale's whole total, the rules leave out excluded
SKUs and non-positive lines). A difference names the field and both sides; the
parity is the share of the last `WINDOW` sales compared that agreed, a gauge per
process, beside the counters by outcome and by field.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from prometheus_client import Counter, Gauge

from contracts.erp import ErpSalePostedV1
from services.files.mapping import points_for
from services.loyalty.rules import Earning, eligible

WINDOW = 1000

SHADOW = Counter("retailbus_loyalty_shadow_total", "Shadow accruals compared with the points file, by outcome",
                 ["outcome"])
FIELDS = Counter("retailbus_loyalty_shadow_mismatch_fields_total",
                 "Fields that differed between the points file and the platform's rules in shadow accruals",
                 ["field"])
PARITY = Gauge("retailbus_loyalty_shadow_parity_ratio",
               "Share of the last shadow accruals (up to 1000) where the points file and the rules agreed")
COMPARED = Gauge("retailbus_loyalty_shadow_compared", "Shadow accruals the parity ratio is taken over")


class Difference(NamedTuple):
    field: str
    file: int
    api: int


def compare(earning: Earning, doc: ErpSalePostedV1, points: list[int]) -> list[Difference]:
    """What differs between the file's record of `doc` and the rules' `points` per line (a
    side that earns nothing has no basis: the file writes no record then)."""
    file_points, api_points = points_for(doc.total_minor), sum(points)
    basis = sum(line.line_total_minor for line in doc.lines if eligible(earning, line.sku, line.line_total_minor))
    sides = (("points", file_points, api_points),
             ("basis_minor", abs(doc.total_minor) if file_points else 0, basis if api_points else 0))
    return [Difference(field, file, api) for field, file, api in sides if file != api]


def describe(differences: list[Difference], tier: str) -> str:
    """The differences as ops read them: `points: file 12, api 18; ... (tier GOLD)`."""
    return "; ".join(f"{d.field}: file {d.file}, api {d.api}" for d in differences) + f" (tier {tier})"


_window: deque[bool] = deque(maxlen=WINDOW)  # this process's last comparisons


def record(differences: list[Difference]) -> None:
    """Count one comparison and move the parity over the last `WINDOW`."""
    SHADOW.labels("mismatch" if differences else "match").inc()
    for d in differences:
        FIELDS.labels(d.field).inc()
    _window.append(not differences)
    PARITY.set(sum(_window) / len(_window))
    COMPARED.set(len(_window))
