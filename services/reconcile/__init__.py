from services.reconcile.service import ReconcileService  # noqa: F401  (`nameko run services.reconcile`)
