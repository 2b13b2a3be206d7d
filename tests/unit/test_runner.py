"""bus/runner.py: `nameko run` whose processes load psycopg2 only when they use it."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

GREEN_ON_IMPORT = """
import sys
from bus.runner import monkey_patch
monkey_patch()
import eventlet.patcher, sqlalchemy
assert eventlet.patcher.is_monkey_patched("socket") and eventlet.patcher.is_monkey_patched("thread")
assert "psycopg2" not in sys.modules, "loaded up front"
import psycopg2.extensions
from eventlet.support.psycopg2_patcher import eventlet_wait_callback
assert psycopg2.extensions.get_wait_callback() is eventlet_wait_callback, "not green"
"""


def test_psycopg2_is_not_loaded_up_front_and_is_green_once_imported():
    done = subprocess.run([sys.executable, "-c", GREEN_ON_IMPORT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_runner_takes_nameko_runs_arguments_and_refuses_others():
    usage = subprocess.run([sys.executable, "-m", "bus.runner", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--config" in usage.stdout and "module[:service class]" in usage.stdout
    bad = subprocess.run([sys.executable, "-m", "bus.runner", "--bogus", "x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unrecognized arguments: --bogus" in bad.stderr
