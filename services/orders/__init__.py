"""Click and collect: the ecommerce experience API (`services.orders.api`) and the order
process on the process engine (`services.orders.process`), two services run apart."""
