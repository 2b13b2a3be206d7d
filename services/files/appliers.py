"""Every inbound file drop's rows must be applied by some service: checked at start.

A drop whose rows nobody applies is published, consumed and thrown away: the
warehouse's stock snapshot once went that way, acked as "not the erp's
business" while the stores never saw it. So the files service refuses to start
(the error names the drop) when a drop configured in filedrops.yaml has no row
contract here, or its row type is applied by no service: the applying service
declares the types it applies (services/erp/file_rows.py `APPLIERS`; the customer
export is the customer hub's, `ELSEWHERE`). Whether
that service is running is for `retailbus up` and the dashboards to show (its
queue has no consumer): RETAILBUS.services does not list every deployment's.
"""
from __future__ import annotations

from collections.abc import Iterable

from nameko.extensions import DependencyProvider

from contracts.errors import RetailbusError
from legacy_wrappers.filedrop import config as fd_config
from services.erp.file_rows import APPLIERS as ERP_APPLIERS, ELSEWHERE
from services.files.mapping import ROW_TYPES

# row type -> the service that applies it
APPLIED_BY = {**{row_type: "erp" for row_type in ERP_APPLIERS}, **ELSEWHERE}


class UnappliedDropError(RetailbusError):
    """A file drop is configured whose rows no service applies (raised when the files service starts)."""


def unapplied(drops: Iterable[str]) -> list[str]:
    """What is wrong with the inbound `drops`: one line per drop whose rows nothing applies."""
    problems = []
    for drop in sorted(drops):
        model = ROW_TYPES.get(drop)
        if model is None:
            problems.append(f"inbound.{drop}: the files service has no row contract for this drop "
                            f"(it reads {', '.join(sorted(ROW_TYPES))})")
            continue
        if model.TYPE not in APPLIED_BY:
            problems.append(f"inbound.{drop}: no service applies its {model.TYPE} rows")
    return problems


class AppliedDrops(DependencyProvider):
    """Runs the check in `setup`: a failing check stops the container before it reads a file."""

    def setup(self):
        problems = unapplied(fd_config.for_container(self.container.config).inbound)
        if problems:
            raise UnappliedDropError("config/filedrops.yaml: " + "; ".join(problems))
