"""Prometheus metrics of the file drops."""
from prometheus_client import Counter, Gauge

ROWS = Counter("retailbus_filedrop_rows_total",
               "Rows by drop and outcome (published, rejected, skipped, written)", ["drop", "outcome"])
FILES = Counter("retailbus_filedrop_files_total",
                "Files by drop and outcome (done, duplicate, rejected, failed, refused, unreadable, "
                "unmovable, written)", ["drop", "outcome"])
BYTES = Counter("retailbus_filedrop_bytes_total", "Bytes read or written by drop", ["drop"])
LAG = Gauge("retailbus_filedrop_lag_seconds",
            "Seconds from a file's last modification to its rows being confirmed", ["drop"])
