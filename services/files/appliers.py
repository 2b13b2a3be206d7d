"""Every inbound file drop's rows must be applied by some service: checked at start.

A drop whose rows nobody applies is published, consumed and thrown away: the
warehouse's stock snapshot once went that way, acked as "not the erp's
business" while the stores never saw it. So the files service refuses to start
(the error names the drop) when a drop configured in filedrops.yaml has no row
contract here, or its row type is applied by no service: the applying service
must declare the type (services/erp/file_rows.py `APPLIERS`) and, when
RETAILBUS.services lists what runs, be listed there.
"""
from __future__ import annotations

from typing import Iterable

from nameko.extensions import DependencyProvider

from contracts.errors import RetailbusError
from legacy_wrappers.filedrop import config as fd_config
from bus.extensions import container_settings
from services.erp.file_rows import APPLIERS as ERP_APPLIERS
from services.files.mapping import ROW_TYPES

APPLIED_BY = {row_type: "erp" for row_type in ERP_APPLIERS}  # row type -> the service that applies it


class UnappliedDropError(RetailbusError):
    """A file drop is configured whose rows no service applies (raised when the files service starts)."""


def unapplied(drops: Iterable[str], services: Iterable[str]) -> list[str]:
    """What is wrong with the inbound `drops`, given the configured `services` (empty: not listed)."""
    running = set(services)
    problems = []
    for drop in sorted(drops):
        model = ROW_TYPES.get(drop)
        if model is None:
            problems.append(f"inbound.{drop}: the files service has no row contract for this drop "
                            f"(it reads {', '.join(sorted(ROW_TYPES))})")
            continue
        applier = APPLIED_BY.get(model.TYPE)
        if applier is None:
            problems.append(f"inbound.{drop}: no service applies its {model.TYPE} rows")
        elif running and applier not in running:
            problems.append(f"inbound.{drop}: its {model.TYPE} rows are applied by the {applier} service, "
                            f"which is not in RETAILBUS.services")
    return problems


class AppliedDrops(DependencyProvider):
    """Runs the check in `setup`: a failing check stops the container before it reads a file."""

    def setup(self):
        drops = fd_config.for_container(self.container.config)
        _, settings = container_settings(self.container.config)
        problems = unapplied(drops.inbound, settings.services)
        if problems:
            raise UnappliedDropError("config/filedrops.yaml: " + "; ".join(problems))
