"""Hot reload in a real ``bidder serve`` under load: watched file, bad file, SIGHUP; no failed request."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time

import pytest

from models import artifact, synthetic
from models.lr import FTRLLogisticRegression
from tests.conftest import launch_server

REQUEST = json.dumps({
    "id": "r", "tmax": 500,
    "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}, {"w": 728, "h": 90}]},
             "bidfloor": 0.01, "bidfloorcur": "USD"}],
    "site": {"id": "s", "domain": "news.example"},
    "device": {"devicetype": 2, "os": "Windows", "geo": {"country": "USA"}},
    "user": {"id": "user-00000007"},
}).encode()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-models")
    data = synthetic.generate(30_000, seed=2).encode(14)
    paths = {}
    for name, shift in (("a", 0.0), ("b", 1.0)):
        m = FTRLLogisticRegression(hash_bits=14, epochs=1).fit(data.X, data.y)
        m.w[m.bias_index] += shift  # b bids ~2.7x higher than a
        m.version = name
        artifact.save(m, d / f"{name}.npz")
        paths[name] = d / f"{name}.npz"
    return paths


def _install(src, dst):
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class Load:
    """Two keep-alive clients sending bid requests until stopped; records every outcome."""

    def __init__(self, port: int):
        self.port, self.stop, self.failures, self.ok, self.reconnects = port, threading.Event(), [], 0, 0
        self.threads = [threading.Thread(target=self._run) for _ in range(2)]
        for t in self.threads:
            t.start()

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("POST", "/openrtb2/bid", REQUEST, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                reason = resp.getheader("X-Nobid-Reason")
                if resp.status not in (200, 204) or reason == "internal_error":
                    self.failures.append((resp.status, reason, body[:200]))
                else:
                    self.ok += 1
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A worker retired by SIGHUP closes its idle keep-alive connections; like any
                # HTTP client, reconnect and send again (the request was never processed).
                self.reconnects += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(("error", repr(exc), b""))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def _versions(server, timeout=10.0) -> dict[int, str]:
    """The model version each worker serves, by pid: ``/readyz`` asked until every worker now
    running has answered (which worker answers is the balancer's choice)."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = set(server.worker_pids())
        if pids and pids <= seen.keys():
            return {pid: seen[pid] for pid in pids}
        status, _, body = server.admin("GET", "/readyz")
        answer = json.loads(body)
        seen[answer["pid"]] = answer["components"]["model"]["version"].split("-")[0]
    raise AssertionError(f"not every worker answered /readyz in {timeout} s: {seen}, "
                         f"workers {server.worker_pids()}")


def _wait_version(server, version, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(_versions(server).values()) == {version}:
            return
        time.sleep(0.1)
    raise AssertionError(f"workers did not all switch to {version}: {_versions(server)}\n"
                         f"{server.log()[-3000:]}")


def _serve_watched(first, live, tmp_path):
    """Two workers serving ``live`` (a copy of ``first``), watched every 0.2 s."""
    _install(first, live)
    return launch_server(tmp_path / "srv", "--workers", "2", "--model", str(live),
                         "--model-watch-s", "0.2",
                         env={"BIDDER_MODEL_SNAPSHOTS": str(tmp_path / "snapshots")})


def test_hot_reload_under_load_never_fails_a_request(artifacts, tmp_path):
    live = tmp_path / "model.npz"
    server = _serve_watched(artifacts["a"], live, tmp_path)
    try:
        assert set(_versions(server).values()) == {"a"}
        load = Load(server.port)
        try:
            time.sleep(0.5)
            _install(artifacts["b"], live)  # 1. the watch picks up a new file in every worker
            _wait_version(server, "b")
            live.write_bytes(b"not a model")  # 2. a bad file is refused, b keeps serving
            time.sleep(1.0)
            assert set(_versions(server).values()) == {"b"}
            _install(artifacts["a"], live)  # 3. SIGHUP: the master reloads, new workers fork with a
            os.kill(server.master_pid, signal.SIGHUP)
            _wait_version(server, "a")
            time.sleep(0.5)
        finally:
            load.finish()
        assert not load.failures, load.failures[:5]
        assert load.ok > 50
        assert load.reconnects <= 4  # at most one closed keep-alive connection per client and worker
        _, _, metrics = server.admin("GET", "/metrics")
        text = metrics.decode()
        assert 'bidder_model_reloads_total{outcome="refused"}' in text
        assert 'bidder_model_reloads_total{outcome="loaded"}' in text
    finally:
        server.stop()


def test_a_respawned_worker_serves_the_last_good_model_not_the_startup_one(artifacts, tmp_path):
    """Review 3 (R7): good b replaces a, then a truncated file replaces b; a worker killed and
    respawned (or all of them after SIGHUP) used to fork with the master's startup model a."""
    model = tmp_path / "model.npz"
    server = _serve_watched(artifacts["a"], model, tmp_path)
    try:
        _install(artifacts["b"], model)
        _wait_version(server, "b")
        broken = tmp_path / "broken.npz"
        broken.write_bytes(artifacts["b"].read_bytes()[:5000])
        os.replace(broken, model)
        time.sleep(0.5)  # both workers refuse it and keep b
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        time.sleep(1.5)
        _wait_version(server, "b")
        os.kill(server.master_pid, signal.SIGHUP)
        time.sleep(2.0)
        _wait_version(server, "b")
        assert "takes up the last good model" in server.log()
    finally:
        server.stop()
