from services.returns.service import ReturnsService  # noqa: F401  (what `nameko run services.returns` runs)
