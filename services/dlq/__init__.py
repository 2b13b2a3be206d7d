"""Dead letters: the `retailbus dlq` workbench (workbench.py, store.py) and the
`dlq` service that exports their depth and age (service.py)."""
from services.dlq.service import DlqService  # noqa: F401  (nameko run services.dlq)
