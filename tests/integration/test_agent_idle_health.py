"""A store agent that has just started and sold nothing yet, against a real RabbitMQ:
its /healthz says the broker is connected (its forwarder connects on its first
publish; the agent's live link until then is its stock feed)."""
from __future__ import annotations

import json
import urllib.request

import pytest

from tests.integration.test_store_agent import agent  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration


def test_an_idle_freshly_started_agent_reports_the_broker_connected(agent):  # noqa: F811
    base, _ = agent  # started, its stock feed subscribed; no sale was sent
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        health = json.loads(response.read())
    assert health["outbox_depth"] == 0 and health["last_confirm_time"] is None  # nothing forwarded yet
    assert health["broker_connected"] is True and health["status"] == "ok", health
