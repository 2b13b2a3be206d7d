from services.erp.service import ErpService  # noqa: F401  (`nameko run services.erp`)
