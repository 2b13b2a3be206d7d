"""Which partitions a process posts (bus/partitions.py), its config, and the
processes `retailbus up` starts for it."""
from __future__ import annotations

import re

import pytest

from bus import partitions
from bus.consumer import reliable_handler
from bus.settings import ConfigError, retailbus_settings
from services.broker import users as broker_users
from services.up import Supervisor

pytestmark = pytest.mark.unit


def test_each_instance_owns_its_share_and_stands_by_for_the_rest():
    assert partitions.owned(2, (0, 2)) == ([0], [1])
    assert partitions.owned(2, (1, 2)) == ([1], [0])
    assert partitions.owned(4, (1, 2)) == ([1, 3], [0, 2])
    assert partitions.owned(3, (0, 1)) == ([0, 1, 2], [])


def test_a_process_of_no_instance_stands_by_for_every_partition():
    assert partitions.owned(3, None) == ([], [0, 1, 2])


def test_instance_is_read_from_the_environment_and_checked():
    assert partitions.instance({"RETAILBUS_INSTANCE": "1/2"}) == (1, 2)
    assert partitions.instance({}) is None
    for bad in ("2/2", "x", "1-2", "-1/2"):
        with pytest.raises(partitions.InstanceError, match="RETAILBUS_INSTANCE"):
            partitions.instance({"RETAILBUS_INSTANCE": bad})


def test_partition_names():
    assert partitions.partition_queues("evt-q", 1) == ["evt-q"]
    assert partitions.partition_queues("evt-q", 3) == ["evt-q.p0", "evt-q.p1", "evt-q.p2"]
    assert partitions.partition_exchange("evt-q") == "evt-q.by_store"


def test_partitions_and_processes_are_validated():
    settings = retailbus_settings({"RETAILBUS": {
        "handlers": {"erp.on_pos_sale": {"partitions": 4, "standby_after": 5}},
        "services": {"erp": {"module": "services.erp", "processes": 2}}}})
    assert settings.handlers["erp.on_pos_sale"].partitions == 4
    assert settings.services["erp"].processes == 2
    with pytest.raises(ConfigError, match="handlers.erp.on_pos_sale.partitions"):
        retailbus_settings({"RETAILBUS": {"handlers": {"erp.on_pos_sale": {"partitions": 0}}}})
    with pytest.raises(ConfigError, match="services.erp.processes"):
        retailbus_settings({"RETAILBUS": {"services": {"erp": {"module": "services.erp", "processes": 0}}}})


def test_up_starts_each_process_with_its_instance_and_metrics_port():
    one = Supervisor._instances("erp", ["nameko"], {"A": "1"}, 1, 9110)
    assert [(c.name, c.env) for c in one] == [("erp", {"A": "1"})]
    two = Supervisor._instances("erp", ["nameko"], {"A": "1"}, 2, 9110)
    assert [c.name for c in two] == ["erp-0", "erp-1"]
    assert [c.component for c in two] == ["erp", "erp"]  # both run as the erp's broker user
    assert [c.env["RETAILBUS_INSTANCE"] for c in two] == ["0/2", "1/2"]
    assert [c.env["RETAILBUS_METRICS_PORT"] for c in two] == ["9110", "9210"]


class Posting:
    name = "posting"

    @reliable_handler("store_agent", "pos.sale.v1", ordered=True)
    def on_sale(self, sale, event):
        pass


def test_a_partitioned_handler_reads_its_partitions_and_the_setup_declares_them():
    config = {"AMQP_URI": "amqp://u:p@127.0.0.1:5682/retailbus",
              "RETAILBUS": {"root": "/tmp/rb", "handlers": {"posting.on_sale": {"partitions": 2}}}}
    access, _ = broker_users.derive(Posting, config)
    _, _, read = access.permissions()
    queue = "evt-store_agent-pos.sale.v1--posting.on_sale"
    assert re.fullmatch(read, queue + ".p0") and re.fullmatch(read, queue + ".p1")
    assert not re.fullmatch(read, queue) and not re.fullmatch(read, queue + ".p2")
    assert ("partitioned", "store_agent.events", "pos.sale.v1", queue, 2, (1.0, 5.0, 30.0)) in access.declares
    assert not any(d[0] == "handler" and d[4] == queue for d in access.declares)
    failed_write, _ = access.topic_permissions()["retailbus.failed"]
    assert re.fullmatch(failed_write, queue + ".p1.dlq")  # a partition's own DLQ


def test_the_dead_letter_workbench_watches_each_partition():
    from services.dlq.store import handler_queues
    config = {"RETAILBUS": {"services": {"erp": {"module": "services.erp"}},
                            "handlers": {"erp.on_pos_sale": {"partitions": 2}}}}
    queues = handler_queues(config, retailbus_settings(config))
    queue = "evt-store_agent-pos.sale.v1--erp.on_pos_sale"
    assert queue + ".p0" in queues and queue + ".p1" in queues and queue not in queues
