from services.customers.service import CustomersService  # noqa: F401  (nameko run services.customers)
