"""Prometheus metrics of the process engine (one registry per process)."""
from prometheus_client import Counter, Gauge, Histogram

INSTANCES = Gauge("retailbus_process_instances", "Process instances by process and state (sampled)",
                  ["process", "state"])
TRANSITIONS = Counter("retailbus_process_transitions_total", "Process transitions: a command sent, resent or "
                      "a compensation sent, a step failed, an instance completed", ["process", "step", "transition"])
STEP_SECONDS = Histogram("retailbus_process_step_seconds", "From a step's command sent to its reply handled",
                         ["process", "step"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
COMPENSATIONS = Counter("retailbus_process_compensations_total", "Steps undone (compensated) or that could not "
                        "be (failed)", ["process", "step", "outcome"])
TIMEOUTS = Counter("retailbus_process_timeouts_total", "Replies not received in a step's timeout",
                   ["process", "step"])
CASES = Counter("retailbus_process_cases_opened_total", "Business exception cases opened by processes",
                ["process", "case_type"])
BY_NAME = {"transitions": TRANSITIONS, "compensations": COMPENSATIONS, "timeouts": TIMEOUTS, "cases": CASES}
STATES = ("running", "compensating", "completed", "failed")
