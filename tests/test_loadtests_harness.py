"""The load-test harness end to end on tiny runs: real servers, real HTTP, real processes."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from loadtests import capacity, openloop, rawload, stack, traffic

BIDDER = [sys.executable, "-m", "bidder.cli"]


@pytest.fixture(scope="module")
def hello(memcached, tmp_path_factory):
    """The hello-world app through ``bidder serve --app`` (2 workers): a fast, fixed target."""
    with stack.Server(["--workers", "2"], memcached.address, str(tmp_path_factory.mktemp("hello")),
                      app="loadtests.hello_app:app") as server:
        yield server


@pytest.mark.parametrize("engine", ["gevent", "raw"])
def test_open_loop_generator_sends_at_the_offered_rate(hello, tmp_path, engine):
    out = str(tmp_path / "gen.json")
    argv = openloop.command(hello.url, 1.0, 200, 8, out, users=2000, engine=engine)
    result = openloop.run_process(argv, out, 60)
    assert result["sent"] == 200 and result["ok"] == 200 and result["failed"] == 0
    assert 150 < result["achieved_rps"] <= 205
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"] < 1000


@pytest.mark.parametrize("engine", ["gevent", "raw"])
def test_closed_loop_generator_reports_throughput(hello, tmp_path, engine):
    out = str(tmp_path / "gen.json")
    result = openloop.run_process(openloop.command(hello.url, 1.0, None, 4, out, engine=engine),
                                  out, 60)
    assert result["mode"] == "closed" and result["failed"] == 0
    assert result["ok"] > 100 and result["achieved_rps"] > 100


@pytest.mark.parametrize("rate", [None, 50.0])
def test_the_raw_engine_counts_what_a_silent_server_leaves_unanswered(rate):
    """A server that accepts but never answers: every request sent is counted unanswered
    (timeout, or not answered before the drain), none as answered, and the run ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        requests = traffic.generate(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = rawload.generate_load(url, requests, 0.5, rate, 2, timeout_s=0.3, drain_s=0.5)
    finally:
        stop.set()
        thread.join()
        for sock in held:
            sock.close()
        listener.close()
    assert result.sent > 0 and result.ok == 0
    assert sum(result.errors.values()) == result.sent, result.errors


def test_the_raw_engine_reopens_connections_the_server_closes(hello, tmp_path):
    """Every request asks for Connection: close, so the server closes each connection after
    its answer: the engine reads the answer, opens another and loses nothing."""
    requests = [traffic.BidRequest(r.body, {**r.headers, "Connection": "close"})
                for r in traffic.generate(8)]
    result = rawload.generate_load(hello.url, requests, 0.5, None, 2)
    assert result.sent > 20 and result.failed == 0 and not result.errors, result.errors


def _locust(url: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "locust"), "-f", "loadtests/locustfile.py",
         "--host", url, "--headless", "-u", "5", "-r", "5", "-t", "2s", "--only-summary",
         "--rate", "100", "--csv", str(tmp_path / "run"),
         # 512 bodies, not 4096: each Locust process makes them inside the 2 s run
         "--distinct-requests", "512", *extra],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=60)


def test_locust_open_loop_passes_the_sla_and_writes_csv(hello, tmp_path):
    # a generous SLA: this checks the mechanism, not this (shared, noisy) machine's tail
    proc = _locust(hello.url, tmp_path, "--sla-p99-ms", "1000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SLA check passed" in proc.stderr
    with open(tmp_path / "run_latency.csv") as f:
        row = next(csv.DictReader(f))
    assert row["mode"] == "open" and int(row["count"]) > 100 and int(row["failed"]) == 0
    assert (tmp_path / "run_stats.csv").exists()  # Locust's own --csv still works


def test_locust_exits_non_zero_when_the_sla_is_missed(hello, tmp_path):
    proc = _locust(hello.url, tmp_path, "--sla-p99-ms", "0.001")
    assert proc.returncode == 1
    assert "SLA check FAILED" in proc.stderr


def test_capacity_search_steps_up_while_passing(hello, tmp_path):
    result = capacity.search(hello.url, sla_p99_ms=1000, start=100, factor=2, max_steps=2,
                             step_s=1.0, warmup_s=0.0, budget_s=60, connections=8,
                             workdir=str(tmp_path))
    assert [s.offered_rps for s in result.steps] == [100, 200]
    assert all(s.passed for s in result.steps)
    assert result.rate == 200 and not result.bracketed
    assert "capacity at p99 <= 1000 ms: 200 requests/s (no failing step seen" \
        in capacity.table(result)


def test_capacity_judges_a_step_by_p99_failures_and_answered_share():
    load = {"ok": 900, "failed": 0, "achieved_rps": 90.0, "nobid_share": 0.1,
            "latency": {"p50_ms": 1.0, "p99_ms": 60.0, "p99_9_ms": 70.0}}
    step = capacity._judge(100.0, load, 50.0)
    assert not step.passed
    assert "p99 60.0 ms > 50 ms" in step.why and "answered only 90/s" in step.why
    load.update(achieved_rps=99.0, latency={"p50_ms": 1.0, "p99_ms": 10.0, "p99_9_ms": 20.0})
    assert capacity._judge(100.0, load, 50.0).passed


def test_ab_end_to_end_writes_the_report(tmp_path):
    out = tmp_path / "ab"
    proc = subprocess.run(BIDDER + ["ab", "--reps", "1", "--duration", "2", "--rate", "50",
                                    "--warmup", "0.5", "--users", "500", "--workers", "2",
                                    "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"arms", "ratios", "machine", "config"}
    assert set(report["arms"]) == {"pinned", "unpinned"}
    for arm in report["arms"].values():
        for key in ("requests", "rps", "p50_ms", "p99_ms", "cpu_us_per_request",
                    "migrations_per_request", "context_switches_per_request"):
            assert key in arm, key
        assert arm["requests"] >= 90 and arm["failed"] == 0
        assert arm["cpu_us_per_request"] > 0
    assert report["arms"]["pinned"]["migrations_per_request"] < 0.05  # pinned workers stay put
    assert report["ratios"]["cpu_us_per_request"]["of"] == "pinned/unpinned"
    assert report["machine"]["cpus"] >= 1 and "placement" in report["machine"]
    assert sorted(report["config"]["order"]) == ["pinned", "unpinned"]
    assert (out / "report.png").stat().st_size > 10_000
    assert "| CPU us/request |" in (out / "report.md").read_text()


def test_bench_prints_the_ratios_to_stock_gunicorn_and_to_the_same_server(tmp_path):
    proc = subprocess.run(BIDDER + ["bench", "--reps", "1", "--duration", "1", "--warmup", "0.5",
                                    "--capacity-budget", "0", "--users", "500", "--stock",
                                    "gthread", "--serve", "--workers 2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio bidder/stock gthread" in proc.stdout and "ratio bidder/hello" in proc.stdout
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["hello_rps"] > 0 and doc["bidder_rps"] > 0
    assert doc["ratio"] == pytest.approx(doc["bidder_rps"] / doc["hello_rps"])
    stock = doc["stock"]["gthread"]
    assert stock["ratio"] == pytest.approx(doc["bidder_rps"] / stock["rps"])
    assert stock["cpu_us_per_request"] > 0
    # stock Gunicorn ran as many workers as the bidder, with its own worker class
    assert {r["app"]: r["workers"] for r in doc["runs"]} == {
        "stock-gthread": 2, "hello": 2, "bidder": 2, "baseline": 2}
    # the 'before' in the same run: the bidder on Gunicorn's path (--no-fast-path)
    before = doc["baseline"]
    assert before["serve"] == "--no-fast-path" and before["cpu_us_per_request"] > 0
    assert before["cpu_change"] == pytest.approx(
        doc["bidder_cpu_us_per_request"] / before["cpu_us_per_request"] - 1)
    assert "bidder --no-fast-path" in proc.stdout
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "gunicorn -k gthread" in proc.stdout


def test_bench_overload_reports_bids_nobids_p99_and_unanswered(tmp_path):
    proc = subprocess.run(BIDDER + ["bench", "--overload", "--duration", "0.5", "--warmup", "0.1",
                                    "--reps", "2", "--users", "200", "--serve", "--workers 1",
                                    "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "overload.json").read_text())
    levels = {r["name"]: r for r in doc["levels"]}
    assert [(n, r["connections"]) for n, r in levels.items()] == [
        ("normal", 4), ("4x", 16), ("32x", 128), ("open 2x", 128)]  # 4 per worker, normally
    # each round's open loop offers twice its own normal rate; the figures pool both rounds
    assert levels["open 2x"]["offered_rps"] == pytest.approx(
        2 * levels["normal"]["answered_rps"], rel=0.05)
    assert doc["rounds"] == 2
    for r in doc["levels"]:
        assert r["bids_per_s"] + r["nobids_per_s"] > 0 and r["unanswered"] >= 0
        assert r["p99_ms"] >= r["p50_ms"] > 0
        assert len(r["bid_share_by_round"]) == 2 and all(x > 0 for x in r["bid_share_by_round"])
        assert len(r["p99_ms_by_round"]) == 2 and max(r["p99_ms_by_round"]) >= r["p99_ms"] * 0.99
    assert levels["normal"]["bid_share_by_round"] == [1.0, 1.0]
    assert "single rounds, bids/normal (p99 ms): 4x " in proc.stdout
    assert doc["tmax_ms"] == 50 and "unanswered" in proc.stdout
    assert (tmp_path / "overload.png").stat().st_size > 0


def test_bench_refuses_an_unknown_stock_worker_class():
    proc = subprocess.run(BIDDER + ["bench", "--stock", "gevent"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "gevent not known; use gthread, sync" in proc.stderr


def test_locust_distributed_merges_every_workers_histogram(hello, tmp_path):
    locust = os.path.join(os.path.dirname(sys.executable), "locust")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = str(stack.free_port())
    workers = [subprocess.Popen([locust, "-f", "loadtests/locustfile.py", "--worker",
                                 "--master-port", port], cwd=root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        proc = _locust(hello.url, tmp_path, "--master", "--master-bind-port", port,
                       "--expect-workers", "2", "--sla-p99-ms", "1000")
    finally:
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "run_latency.csv") as f:
        ours = int(next(csv.DictReader(f))["count"])
    with open(tmp_path / "run_stats.csv") as f:
        total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    theirs = int(total["Request Count"])
    assert ours == theirs > 100  # the last samples of both workers reached the verdict
