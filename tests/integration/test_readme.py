"""The README's quick start, run as written against a running `retailbus up`: the
shell blocks are taken from README.md and run by bash in a fresh project folder
(the shipped config/, the project's .venv), and print what the README promises.
The only change: the shipped ports become free ones, so the test never meets
another estate on this machine."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_ports
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
RETAILBUS = Path(sys.executable).with_name("retailbus")


def quick_start() -> str:
    """The README's shell blocks from `export PATH` to the signed sale and its trace."""
    blocks = re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    path = next(b for b in blocks if b.startswith("export PATH="))
    sale = next(b for b in blocks if "agent keys add" in b and "curl" in b)
    return path + sale


def project(root: Path) -> dict[str, int]:
    """A fresh project folder: the shipped config with free ports, the project's .venv."""
    shutil.copytree(REPO / "config", root / "config")
    (root / ".venv").symlink_to(REPO / ".venv")
    mq, dist, mgmt, erp, s1, s2, *metrics = free_ports(8)
    path = root / "config" / "bus.yaml"
    config = yaml.safe_load(path.read_text())
    rb = config["RETAILBUS"]
    rb["broker"].update(port=mq, dist_port=dist, management_port=mgmt)
    rb["services"] = {name: {**rb["services"][name], "metrics_port": port}
                      for name, port in zip(("erp", "journal"), metrics)}  # what the quick start needs
    rb["stores"] = [{"id": "S001", "http": f"127.0.0.1:{s1}"}, {"id": "S002", "http": f"127.0.0.1:{s2}"}]
    rb["legacy_erp"]["http"] = f"127.0.0.1:{erp}"
    loyalty, crm = free_ports(2)
    rb["loyalty_platform"] = {"http": f"127.0.0.1:{loyalty}", "db": "var/loyalty_platform.db"}
    rb["crm"] = {"http": f"127.0.0.1:{crm}", "db": "var/crm.db"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    routes = root / "config" / "routes.yaml"
    routes.write_text(routes.read_text().replace("127.0.0.1:8081", f"127.0.0.1:{erp}"))
    return {"agent": s1}


def healthy(url: str) -> bool:
    try:
        return json.loads(urllib.request.urlopen(url, timeout=1).read())["broker_connected"] is True
    except (OSError, ValueError, KeyError):
        return False


@pytest.mark.timeout(600)
def test_the_readme_quick_start_prints_what_it_promises(tmp_path):
    ports = project(tmp_path)
    # a reader's fresh shell: nothing this test session set (no RETAILBUS_*, no virtualenv),
    # and no retailbus on PATH (the README says how to put it there)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": os.environ.get("LANG", "C.UTF-8"), "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([str(RETAILBUS), "up"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        assert wait_for(lambda: healthy(f"http://127.0.0.1:{ports['agent']}/healthz") or up.poll() is not None,
                        timeout=240), (tmp_path / "up.log").read_text()[-3000:]
        assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        script = quick_start().replace("127.0.0.1:8101", f"127.0.0.1:{ports['agent']}")
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)
        # the shipped routes file, unedited, validates against what the agents run: nothing moves
        checked = subprocess.run([str(RETAILBUS), "routes", "validate", "config/routes.yaml"], cwd=tmp_path,
                                 env=env, capture_output=True, text=True, timeout=60)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=120)
        finally:
            log.close()
    out = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(out[0])  # curl's answer on a line of its own
    assert answer["STATUS"] == "OK" and answer["DOC_NO"] == "PENDING", out
    assert out[1] == "S00000001|RBUS|3998", out  # the ERP's row, after the poll
    assert out[2].split()[:4] == ["TIME", "(UTC)", "SERVICE", "HOP"], out
    hops = [line.split()[3] for line in out[3:]]
    assert [h for h in hops if h in ("accepted", "forwarded", "consumed", "posted")][:4] == [
        "accepted", "forwarded", "consumed", "posted"], out
    assert "stored in" in done.stderr and "terminal_keys.json" in done.stderr
    assert checked.returncode == 0, checked.stderr
    assert "version 2 (active: v1)" in checked.stdout and "S002: bus (unchanged)" in checked.stdout, checked.stdout
