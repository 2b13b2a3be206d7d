"""A throwaway PostgreSQL cluster from Debian's packages, for tests and benchmarks.

initdb and postgres refuse to run as root, so as root they run as the
`postgres` system user, in a folder of its own under the temp directory
(pytest's folders are private to root). The cluster listens on 127.0.0.1 on
a free port with a generated password, its socket in its own folder, and is
stopped by `pg_ctl stop` (then by its own pid) — never by process name.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

USER = "retailbus"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    def __init__(self):
        self.home = Path(tempfile.mkdtemp(prefix="retailbus-pg-"))
        self.password = secrets.token_urlsafe(18)
        self.port = _free_port()
        self._as_root = os.geteuid() == 0

    def _run(self, *args, **kwargs):
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        return subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, **kwargs)

    def start(self) -> "PostgresCluster":
        os.chmod(self.home, 0o700)
        (self.home / "pw").write_text(self.password)
        (self.home / "sock").mkdir()
        if self._as_root:
            shutil.chown(self.home, "postgres", "postgres")
            for p in self.home.iterdir():
                shutil.chown(p, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.home / "data"), "-U", USER, "--pwfile", str(self.home / "pw"),
                  "--auth", "scram-sha-256", "--no-locale", "-E", "UTF8")
        (self.home / "pw").unlink()
        options = (f"-p {self.port} -k {self.home / 'sock'} -c listen_addresses=127.0.0.1"
                   " -c max_connections=200 -c shared_buffers=64MB")
        self._run(_bin("pg_ctl"), "-D", str(self.home / "data"), "-l", str(self.home / "log"),
                  "-o", options, "-w", "-t", "60", "start")
        return self

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        engine = create_engine(self.dsn(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))  # our own generated name
        finally:
            engine.dispose()
        return self.dsn(name)

    def _pid(self) -> int | None:
        try:
            return int((self.home / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        pid = self._pid()
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.home / "data"), "-m", "fast", "-w", "-t", "30", "stop")
        except subprocess.CalledProcessError:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    time.sleep(0.5)
                except ProcessLookupError:
                    pass
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
