"""A throwaway PostgreSQL cluster: ``initdb`` into a temporary directory, ``pg_ctl`` start/restart/stop.

The suite's session cluster (tests/conftest.py), the database-outage tests (tests/db/test_outage.py) and
``benchmarks/operations.py`` use it. As root, the server runs as the ``postgres`` user (it refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_START_TIMEOUT_S = 60  # seconds pg_ctl waits for the cluster to accept connections
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"  # throwaway: speed over safety


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl live: PATH first, else the newest Debian cluster version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_as_postgres(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a server command; as root, as the ``postgres`` user (the server refuses to run as root)."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PG_START_TIMEOUT_S + 30)


class ClusterError(RuntimeError):
    pass


class ThrowawayCluster:
    """One cluster on a free port of 127.0.0.1, trust authentication, deleted by :meth:`remove`."""

    def __init__(self, bindir: Path, prefix: str = "adapterlens-pg-") -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.data, self.sockets, self.logfile = self.root / "data", self.root / "sock", self.root / "server.log"
        self.sockets.mkdir()
        if os.geteuid() == 0:
            for path in (self.root, self.sockets):
                shutil.chown(path, "postgres", "postgres")
        self.port = free_port()
        self.running = False

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the maintenance database ``postgres``."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args])

    def init(self) -> None:
        init = run_as_postgres([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                                "--auth=trust", "-E", "UTF8", "--no-sync"])
        if init.returncode != 0:
            raise ClusterError(f"initdb failed:\n{init.stdout}\n{init.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 {SERVER_OPTIONS}"
        done = self._pg_ctl("-l", str(self.logfile), "-w", "-t", str(PG_START_TIMEOUT_S), "-o", options, "start")
        if done.returncode != 0:
            log_text = self.logfile.read_text() if self.logfile.exists() else ""
            raise ClusterError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{log_text}")
        self.running = True

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every connection is closed (``fast``: sessions are terminated)."""
        done = self._pg_ctl("-l", str(self.logfile), "-w", "-t", str(PG_START_TIMEOUT_S), "-m", mode, "restart")
        if done.returncode != 0:
            raise ClusterError(f"pg_ctl restart failed:\n{done.stdout}\n{done.stderr}")

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._pg_ctl("-m", mode, "-w", "stop")
            self.running = False

    def remove(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def stop_orphaned_clusters(bindir: Path) -> None:
    """Stop and delete throwaway clusters whose owning process died without cleaning up (SIGKILL)."""
    for owner_file in glob.glob(os.path.join(tempfile.gettempdir(), "adapterlens-pg-*", "owner.pid")):
        root = Path(owner_file).parent
        try:
            os.kill(int(Path(owner_file).read_text()), 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue
        if (root / "data" / "postmaster.pid").exists():
            run_as_postgres([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
