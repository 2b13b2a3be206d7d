"""The business exception workbench: cases any service opens, worked by ops with `retailbus cases`."""
from services.cases.service import CasesService  # noqa: F401  (`nameko run services.cases`)
