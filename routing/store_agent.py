from routing.agent import StoreAgent  # noqa: F401  (`nameko run routing.store_agent`)
