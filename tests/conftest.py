"""Shared fixtures: a real memcached and real ``bidder serve`` processes on free loopback ports."""
from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator

import pytest

from loadtests.memcached_proc import EmbeddedMemcached
from loadtests.postgres_proc import EmbeddedPostgres
from bidder.metrics import FLUSH_S
from bidder.seed import seed_users
from loadtests import stack

SEEDED_USERS = 2000


@pytest.fixture(scope="session")
def memcached() -> Iterator[EmbeddedMemcached]:
    with EmbeddedMemcached(memory_mb=64) as mc:
        seed_users(mc.address, SEEDED_USERS, progress=False)
        yield mc


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    """A private PostgreSQL cluster (initdb + pg_ctl in a temp dir; as root, run as an
    unprivileged user), shared by the session: each test uses a database of its own."""
    with EmbeddedPostgres() as pg:
        yield pg


@pytest.fixture
def pg_url(postgres, request) -> str:
    """A fresh database in the private cluster, for one test."""
    import psycopg

    name = "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name.lower())[:50]
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + "/" + name


class Server(stack.Server):
    """A running ``bidder serve`` (the harnesses' launcher) with helpers to talk HTTP to it."""

    def worker_pids(self) -> list[int]:
        return self.workers()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 5.0,
                port: int | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request to the bid port (or ``port``) on its own connection."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            conn.close()

    def admin(self, method: str, path: str, **kwargs) -> tuple[int, dict[str, str], bytes]:
        """One request to the admin listener (``/metrics``, ``/readyz``)."""
        return self.request(method, path, port=self.admin_port, **kwargs)

    def bid(self, payload: dict | bytes, headers: dict[str, str] | None = None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/openrtb2/bid", body,
                            {"Content-Type": "application/json", **(headers or {})})

    def metrics(self) -> str:
        """``GET /metrics`` once every worker has written its bid-path counts: the worker that
        answers writes its own at once, the others every ``FLUSH_S``."""
        time.sleep(3 * FLUSH_S)
        status, _, body = self.admin("GET", "/metrics")
        assert status == 200, body
        return body.decode()

    def log(self) -> str:
        with open(self.logfile, errors="replace") as fh:
            return fh.read()


def launch_server(workdir, *args: str, memcached: str = "none", ready: bool = True,
                  env: dict[str, str] | None = None) -> Server:
    """Start ``bidder serve`` with ``args`` on a free port, its files (and its ledger,
    ``ledger.sqlite3``) in ``workdir``; ready (admin ``/readyz`` 200) unless ``ready`` is false."""
    os.makedirs(workdir, exist_ok=True)
    server = Server(["--ledger", os.path.join(workdir, "ledger.sqlite3"), *args], memcached,
                    str(workdir), env=env)
    return server.start(settle_s=0) if ready else server.launch()


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Factory: ``start_server(*serve_args, memcached=ADDR)`` -> a ready ``Server``, stopped after."""
    started: list[Server] = []

    def start(*args: str, **kwargs) -> Server:
        server = launch_server(tmp_path / f"server-{len(started)}", *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
