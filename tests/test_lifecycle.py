"""The life cycle of bidder/serve.py: /metrics sums every worker, whatever the import order,
and no per-process set-up hides outside the hooks."""
from __future__ import annotations

import ast
import http.client
import json
import subprocess
import sys
import time

from tests.test_layers import ROOT
from tests.test_bid_http import site_request


def _pid_of(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    return json.loads(response.read())["pid"]


def _bid(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/openrtb2/bid", json.dumps(site_request()),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def _requests_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bidder_bid_requests_total{"))


def test_metrics_sum_the_bid_counts_of_every_worker(start_server, memcached):
    """Two keep-alive connections held by two different workers, a known number of bids on
    each: /metrics (answered by one of them) counts them all."""
    server = start_server("--workers", "2", memcached=memcached.address)
    deadline = time.monotonic() + 20
    while True:  # the balanced worker spreads connections; open pairs until they differ
        conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=5) for _ in "ab"]
        pids = [_pid_of(conn) for conn in conns]
        if pids[0] != pids[1]:
            break
        for conn in conns:
            conn.close()
        assert time.monotonic() < deadline, "two connections never reached two workers"
    sent = {pids[0]: 7, pids[1]: 11}
    for conn, pid in zip(conns, pids):
        statuses = {_bid(conn) for _ in range(sent[pid])}
        assert statuses <= {200, 204}, statuses
        assert _pid_of(conn) == pid  # the same worker answered them all
        conn.close()
    text = server.metrics()
    assert _requests_total(text) == sum(sent.values()), text
    live = [line for line in text.splitlines() if line.startswith("bidder_worker_info{")]
    assert all(any(f'pid="{pid}"' in line for line in live) for pid in pids), live


def test_the_cli_entry_sets_the_metrics_directory_before_prometheus_client_loads():
    code = """
import sys
from bidder import cli, metrics_dir
assert "prometheus_client" not in sys.modules, "bidder.cli loaded prometheus_client"
with metrics_dir.fresh():
    cli.load_command("serve")
    from prometheus_client import values
    print(values.ValueClass.__qualname__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "MultiProcessValue" in done.stdout, done.stdout


def test_serve_refuses_to_start_without_the_metrics_directory():
    code = ("import sys; from bidder import serve, settings; "
            "sys.exit(serve.serve(settings.resolve(environ={})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "PROMETHEUS_MULTIPROC_DIR is not set" in done.stderr and "bidder serve" in done.stderr


def test_no_set_up_hides_in_register_at_fork():
    """Per-process set-up runs from the post_fork hook of bidder/serve.py, where it can be read."""
    found = []
    for package in ("bidder", "server_hooks", "models"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "register_at_fork":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_a_stop_signal_before_gunicorns_handlers_is_not_lost():
    """Between fork and Gunicorn's ``init_signals`` a worker ran the master's handlers, which
    only queue the signal: a SIGTERM then left it serving until killed after the graceful
    timeout. ``post_fork``'s first step makes it leave its loop instead (a real signal, to
    a real process)."""
    code = """
import os, signal
from types import SimpleNamespace
from server_hooks.hooks import stop_early
worker = SimpleNamespace(alive=True)
stop_early(worker)
os.kill(os.getpid(), signal.SIGTERM)
print("alive" if worker.alive else "stopping")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopping"


def test_a_stop_signal_before_post_fork_is_not_lost_either():
    """Earlier still, between fork and ``post_fork``, the master's handler (here its very
    code: put the signal in the arbiter's queue) took a SIGTERM into the child's copy of that
    queue; the worker served on until killed after the graceful timeout (once in session 10's
    five runs of the test below). ``stop_early`` now reads that copy (a real signal, to a real
    process)."""
    code = """
import os, queue, signal
from types import SimpleNamespace
from server_hooks.hooks import stop_early
def child(signals):
    inherited = queue.SimpleQueue()
    inherited.put_nowait(signal.SIGCHLD)  # what else the master had queued: not a stop
    signal.signal(signal.SIGTERM, lambda signum, frame: inherited.put_nowait(signum))
    for signum in signals:  # reaches the master's handler, as before post_fork
        os.kill(os.getpid(), signum)
    worker = SimpleNamespace(alive=True)
    stop_early(worker, inherited)
    return "alive" if worker.alive else "stopping"
print(child([]), child([signal.SIGTERM]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alive stopping"


def test_a_server_stopped_just_after_it_started_stops_at_once(start_server):
    """Stopped as soon as one worker answers, while the other may still be setting up (on a
    busy box, without stop_early, it ran on until killed 10 s later in 3 of 4 runs)."""
    for _ in range(3):
        server = start_server("--workers", "2")  # the bid app: its per-process set-up
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5, server.log()[-2000:]
