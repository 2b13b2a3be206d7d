"""Transport benchmark: our publisher and reliable consumer against plain py-amqp.

DESIGN.md promises many confirms in flight ("waiting for each one caps a
publisher at a tenth of the broker"). This measures whether the bus keeps
that promise: (a) raw confirmed publishing, (b) our ConfirmingPublisher under
500 concurrent nameko workers, (c) raw publish + consume end to end, (d) our
publisher + reliable_handler end to end. Goals: b/a >= 0.8, d/c >= 0.5.

Everything runs green (eventlet, monkey-patched) in this one process, raw
baselines included, so both sides use the same socket layer; see README.md.
"""
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # its import-time banner
import eventlet  # noqa: E402

eventlet.monkey_patch()  # nameko containers run on eventlet; must precede other imports

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import amqp  # noqa: E402
from nameko.containers import ServiceContainer  # noqa: E402
from nameko.extensions import Entrypoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import (SAMPLE_TYPE, bench_broker, connect, emit_json, environment,  # noqa: E402
                          median, peak_rss_kib, process_hwm_kib, sample_event, sample_events)
from bus import topology  # noqa: E402
from bus.consumer import reliable_handler  # noqa: E402
from bus.queue_consumer import ReliableConsumer  # noqa: E402
from bus.extensions import EventPublisher  # noqa: E402

WINDOW = 500          # unconfirmed publishes in flight (raw) / concurrent publishing workers (ours)
PREFETCH = 500        # unacked deliveries per consumer, raw and ours
RAW_QUEUE = "bench.transport.raw"
RAW_EXCHANGE = "bench_raw.events"   # a topic exchange like ours: same routing work at the broker
PUB_SERVICE, E2E_SERVICE = "bench_pub", "bench_e2e"
PUB_QUEUE = "bench.transport.ours"
E2E_QUEUE = topology.handler_queue(E2E_SERVICE, SAMPLE_TYPE, E2E_SERVICE, "on_query")
GOALS = {"b_over_a": 0.8, "d_over_c": 0.5}


# ---------------------------------------------------------------- raw py-amqp

def raw_publish(uri: str, queue: str, body: bytes, n: int, window: int = WINDOW) -> None:
    """Persistent, confirmed, mandatory publishes through a topic exchange bound to
    `queue` (the same transport work as ours), at most `window` unconfirmed;
    returns when all n are confirmed. `queue` only names the test's binding."""
    conn = connect(uri)
    try:
        ch = conn.channel()
        ch.confirm_select()
        # As our publisher does: read the socket only while waiting for confirms,
        # not once per basic_publish (py-amqp's connection.blocked check).
        conn.client_properties.get("capabilities", {})["connection.blocked"] = False
        floor, singles = 0, set()  # all tags <= floor confirmed, plus these single ones

        def on_ack(tag, multiple):
            nonlocal floor, singles
            if multiple:
                floor, singles = tag, {t for t in singles if t > tag}
            else:
                singles.add(tag)

        def on_nack(tag, multiple):
            raise RuntimeError(f"broker nacked publish {tag}")

        ch.events["basic_ack"].add(on_ack)
        ch.events["basic_nack"].add(on_nack)
        for i in range(n):
            while i - floor - len(singles) >= window:
                conn.drain_events(timeout=10)
            msg = amqp.Message(body, delivery_mode=2, content_type="application/cloudevents+json",
                               message_id=f"raw-{i}", correlation_id="raw", type=SAMPLE_TYPE)
            ch.basic_publish(msg, RAW_EXCHANGE, SAMPLE_TYPE, mandatory=True)
        while floor + len(singles) < n:
            conn.drain_events(timeout=10)
    finally:
        conn.close()


def raw_consume(uri: str, queue: str, n: int, started: eventlet.event.Event,
                prefetch: int = PREFETCH) -> float:
    """Consume and ack (one by one, manual) n messages; the monotonic time of the last ack."""
    conn = connect(uri)
    try:
        ch = conn.channel()
        ch.basic_qos(0, prefetch, False)
        count = 0

        def on_message(message):
            nonlocal count
            ch.basic_ack(message.delivery_tag)
            count += 1

        ch.basic_consume(queue, callback=on_message)
        started.send(True)
        while count < n:
            conn.drain_events(timeout=10)
        return time.monotonic()
    finally:
        conn.close()


def run_raw_publish(uri, body, n):
    started = time.monotonic()
    raw_publish(uri, RAW_QUEUE, body, n)
    return n / (time.monotonic() - started)


def run_raw_end_to_end(uri, body, n):
    """Publisher and consumer as two greenthreads of this process, two connections."""
    consuming = eventlet.event.Event()
    consumer = eventlet.spawn(raw_consume, uri, RAW_QUEUE, n, consuming)
    consuming.wait()
    started = time.monotonic()
    publisher = eventlet.spawn(raw_publish, uri, RAW_QUEUE, body, n)
    publisher.wait()
    return n / (consumer.wait() - started)


# ---------------------------------------------------------------- ours (nameko)

class Trigger(Entrypoint):
    """An entrypoint that fires only when the benchmark spawns a worker for it."""


trigger = Trigger.decorator


def publish_batch(publisher, events):
    errors = [e for e in publisher.publish_many(events) if e is not None]
    if errors:
        raise errors[0]


class PublishingService:
    """(b): workers that publish their share of events as one batch (as the outbox
    forwarder, the file drops and the erp's outbox relay do); (b1) one at a time."""

    name = PUB_SERVICE
    events = EventPublisher()

    @trigger
    def publish_all(self, events):
        publish_batch(self.events, events)

    @trigger
    def publish_each(self, events):
        for event in events:
            self.events.publish(event)


class Handled:
    """Acks counted on the consumer (the end of the end-to-end path)."""

    count = 0
    target = 0
    done = None


class EndToEndService:
    """(d): the same publishing workers, and a reliable_handler that does nothing."""

    name = E2E_SERVICE
    events = EventPublisher()

    @trigger
    def publish_all(self, events):
        publish_batch(self.events, events)

    @reliable_handler(E2E_SERVICE, SAMPLE_TYPE)
    def on_query(self, payload, event):
        pass


def count_acks(consumer: ReliableConsumer):
    """Wrap the container's consumer.settle so the benchmark sees every ack."""
    settle = consumer.settle

    def counting_settle(message, ack=True):
        settle(message, ack)
        Handled.count += 1
        if Handled.count == Handled.target:
            Handled.done.send(time.monotonic())

    consumer.settle = counting_settle


def start_container(service_cls, uri: str, root: str, max_workers: int) -> ServiceContainer:
    container = ServiceContainer(service_cls, {
        "AMQP_URI": uri, "max_workers": max_workers,
        # all workers start at once: the last wait for every other worker's confirms
        "RETAILBUS": {"root": root, "retry": {"delays": [1], "prefetch": PREFETCH},
                      "publisher": {"confirm_timeout": 60}},
    })
    container.start()
    return container


def publish_with_workers(container: ServiceContainer, events, workers: int = WINDOW,
                         method: str = "publish_all") -> None:
    """Spread events over `workers` concurrent nameko workers; return when all are done."""
    entrypoint = next(e for e in container.entrypoints
                      if isinstance(e, Trigger) and e.method_name == method)
    shares = [events[i::workers] for i in range(workers)]
    remaining, finished, errors = [len(shares)], eventlet.event.Event(), []

    def handle_result(worker_ctx, result, exc_info):
        if exc_info is not None:
            errors.append(exc_info[1])
        remaining[0] -= 1
        if remaining[0] == 0:
            finished.send(True)
        return result, exc_info

    for share in shares:
        container.spawn_worker(entrypoint, (share,), {}, handle_result=handle_result)
    finished.wait()
    if errors:
        raise RuntimeError(f"{len(errors)} publishing workers failed, first: {errors[0]!r}")


def run_ours_publish(container, n, profile, method="publish_all"):
    events = sample_events(n)
    started = time.monotonic()
    with profile:
        publish_with_workers(container, events, method=method)
    return n / (time.monotonic() - started)


def run_ours_end_to_end(container, n, profile):
    events = sample_events(n)
    Handled.count, Handled.target, Handled.done = 0, n, eventlet.event.Event()
    started = time.monotonic()
    with profile:
        publish_with_workers(container, events)
        last_ack = Handled.done.wait()
    return n / (last_ack - started)


# ---------------------------------------------------------------- orchestration

def declare(uri: str) -> None:
    """Durable queues for every part; (b)'s bound to its service exchange (mandatory)."""
    conn = connect(uri)
    try:
        ch = conn.channel()
        for q in (RAW_QUEUE, PUB_QUEUE, E2E_QUEUE):
            ch.queue_delete(q)
        ch.queue_declare(RAW_QUEUE, durable=True, auto_delete=False)
        topology.declare_exchange(ch, RAW_EXCHANGE)
        ch.queue_bind(RAW_QUEUE, RAW_EXCHANGE, SAMPLE_TYPE)
        ch.queue_declare(PUB_QUEUE, durable=True, auto_delete=False)
        exchange = topology.events_exchange(PUB_SERVICE)
        topology.declare_exchange(ch, exchange)
        ch.queue_bind(PUB_QUEUE, exchange, SAMPLE_TYPE)
    finally:
        conn.close()


def purge(uri: str, *queues: str) -> None:
    conn = connect(uri)
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_purge(q)
    finally:
        conn.close()


def queue_depth(uri: str, queue: str) -> int:
    conn = connect(uri)
    try:
        return conn.channel().queue_declare(queue, passive=True).message_count
    finally:
        conn.close()


class Profile:
    """cProfile around the timed 'ours' sections when --profile is given, else nothing."""

    def __init__(self, enabled: bool):
        self.profiler = cProfile.Profile() if enabled else None

    def __enter__(self):
        if self.profiler:
            self.profiler.enable()

    def __exit__(self, *exc):
        if self.profiler:
            self.profiler.disable()

    def report(self, title: str, limit: int = 30):
        if self.profiler:
            print(f"\n--- profile of {title}: top {limit} by own time ---", file=sys.stderr)
            pstats.Stats(self.profiler, stream=sys.stderr).sort_stats("tottime").print_stats(limit)


def bench(uri: str, n: int, runs: int, profile: bool) -> dict:
    body = sample_event().to_json()
    print(f"{n} persistent messages of {len(body)} bytes per run, {runs} runs; "
          f"window/workers {WINDOW}, prefetch {PREFETCH}; all green in one process", flush=True)
    declare(uri)
    root = tempfile.mkdtemp(prefix="retailbus-bench-root-")
    pub = start_container(PublishingService, uri, root, max_workers=WINDOW)
    e2e = start_container(EndToEndService, uri, root, max_workers=WINDOW + PREFETCH)
    profiles = {"b": Profile(profile), "d": Profile(profile)}
    try:
        consumer = next(e for e in e2e.subextensions if isinstance(e, ReliableConsumer))
        consumer.ready.wait()
        count_acks(consumer)
        # warm up: connect the publishers, fill caches, so runs time steady state only
        run_raw_publish(uri, body, 1000)
        run_ours_publish(pub, 1000, Profile(False))
        run_ours_end_to_end(e2e, 1000, Profile(False))
        purge(uri, RAW_QUEUE, PUB_QUEUE)
        results = {k: [] for k in ("a", "b", "b1", "c", "d")}
        for run in range(1, runs + 1):
            results["a"].append(run_raw_publish(uri, body, n))
            purge(uri, RAW_QUEUE)
            results["b"].append(run_ours_publish(pub, n, profiles["b"]))
            purge(uri, PUB_QUEUE)
            results["b1"].append(run_ours_publish(pub, n, Profile(False), method="publish_each"))
            purge(uri, PUB_QUEUE)
            results["c"].append(run_raw_end_to_end(uri, body, n))
            results["d"].append(run_ours_end_to_end(e2e, n, profiles["d"]))
            print(f"run {run}: " + "  ".join(f"{k}={results[k][-1]:8.0f}/s" for k in results),
                  flush=True)
        for queue in (RAW_QUEUE, E2E_QUEUE):
            if depth := queue_depth(uri, queue):
                raise RuntimeError(f"{queue} still holds {depth} messages after the runs")
    finally:
        for container in (pub, e2e):
            try:
                container.stop()
            except Exception:
                container.kill()
    profiles["b"].report("(b) our publisher")
    profiles["d"].report("(d) our end to end")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (>= 3)")
    parser.add_argument("--amqp-uri", help="use this broker instead of a throw-away node")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the 'ours' parts (b, d) and print the top functions to stderr")
    args = parser.parse_args(argv)
    if args.runs < 3 or args.messages < WINDOW:
        parser.error(f"need --runs >= 3 and --messages >= {WINDOW}")

    with bench_broker(args.amqp_uri) as (uri, broker):
        env = environment(uri)
        results = bench(uri, args.messages, args.runs, args.profile)
        broker_hwm = process_hwm_kib(broker.pid() if broker else None)

    names = {"a": "raw publish", "b": "our publisher", "b1": "our publisher one by one",
             "c": "raw end to end", "d": "our end to end"}
    medians = {k: median(v) for k, v in results.items()}
    ratios = {"b_over_a": medians["b"] / medians["a"], "d_over_c": medians["d"] / medians["c"]}
    met = {k: ratios[k] >= GOALS[k] for k in GOALS}
    print()
    for k, name in names.items():
        runs = ", ".join(f"{v:.0f}" for v in results[k])
        print(f"({k}) {name:15s} median {medians[k]:8.0f} msg/s   runs: {runs}")
    for k, label in (("b_over_a", "b/a"), ("d_over_c", "d/c")):
        print(f"{label} = {ratios[k]:.2f}  (goal >= {GOALS[k]}: {'met' if met[k] else 'MISSED'})")
    rss = peak_rss_kib()
    print(f"peak RSS: benchmark process {rss / 1024:.0f} MiB, broker "
          + (f"{broker_hwm / 1024:.0f} MiB" if broker_hwm else "n/a (external broker)"))
    print(f"python {env['python']}, RabbitMQ {env['rabbitmq']}")
    emit_json({
        "bench": "transport", **env, "messages": args.messages, "runs": args.runs,
        "window": WINDOW, "prefetch": PREFETCH, "body_bytes": len(sample_event().to_json()),
        "msgs_per_s": {names[k].replace(" ", "_"): [round(v, 1) for v in results[k]] for k in names},
        "median_msgs_per_s": {names[k].replace(" ", "_"): round(medians[k], 1) for k in names},
        "ratios": {k: round(v, 3) for k, v in ratios.items()}, "goals": GOALS, "goals_met": met,
        "peak_rss_kib": {"bench": rss, "broker": broker_hwm},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
