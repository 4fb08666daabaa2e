"""A private PostgreSQL cluster for the tests, the fleet demo and the fleet harness.

``initdb`` + ``pg_ctl`` in a temporary directory, listening on a free loopback port with
trust authentication for one role, stopped and removed on exit. PostgreSQL refuses to run as
root, so as root the cluster belongs to an unprivileged user (``postgres`` when it exists,
else ``nobody``) and its commands run through ``runuser``.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from types import TracebackType

from loadtests.memcached_proc import free_port, wait_for_port

ROLE = "bidder"
INSTALL_HINT = ("PostgreSQL is not installed: 'sudo apt-get install -y postgresql' (Debian/"
                "Ubuntu; `make test` does it), 'sudo dnf install -y postgresql-server' or 'brew "
                "install postgresql', or give a running server with --ledger postgresql://...")


class PostgresNotFound(RuntimeError):
    """No initdb/pg_ctl binaries."""


def binaries() -> str:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH first, then Debian's layout."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(directory, "initdb")):
            return directory
    raise PostgresNotFound(INSTALL_HINT)


def _owner() -> str | None:
    """The user to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresNotFound("running as root and neither a 'postgres' nor a 'nobody' user "
                           "exists to run PostgreSQL as: create one (useradd postgres)")


class EmbeddedPostgres:
    """A throwaway cluster: ``with EmbeddedPostgres() as pg: pg.url``.

    ``durable=False`` (the default) turns fsync off: the cluster is deleted on exit anyway,
    and the tests and harnesses measure the bidder, not the disk.
    """

    def __init__(self, durable: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.durable = durable
        self.directory: str | None = None
        self.user = _owner()

    @property
    def url(self) -> str:
        return f"postgresql://{ROLE}@{self.host}:{self.port}/postgres"

    @property
    def data(self) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, "data")

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        argv = list(cmd) if self.user is None else ["runuser", "-u", self.user, "--", *cmd]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> "EmbeddedPostgres":
        bin_dir = binaries()
        self.directory = tempfile.mkdtemp(prefix="bidder-pg-")
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        os.chmod(self.directory, 0o700)
        try:
            self._run(os.path.join(bin_dir, "initdb"), "-D", self.data, "-U", ROLE,
                      "-A", "trust", "-E", "UTF8", "--no-sync")
            options = (f"-c listen_addresses={self.host} -c port={self.port} "
                       f"-c unix_socket_directories={self.directory} -c max_connections=200")
            if not self.durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            self._run(os.path.join(bin_dir, "pg_ctl"), "-D", self.data, "-o", options,
                      "-l", os.path.join(self.directory, "server.log"), "-w", "-t", "30",
                      "start")
            wait_for_port(self.host, self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory or "", "server.log"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.directory is None:
            return
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            try:
                self._run(os.path.join(binaries(), "pg_ctl"), "-D", self.data, "-m", "fast",
                          "-w", "-t", "30", "stop")
            except RuntimeError:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None

    def __enter__(self) -> "EmbeddedPostgres":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
