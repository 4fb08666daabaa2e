"""How evenly do prefork workers share keep-alive connections? Measure it over many fresh starts.

Each start boots a fresh server (2 workers by default), opens 8 keep-alive
connections at once, as an exchange's connection pool does, drives requests
on them for a few seconds (closed loop), and reads each worker's CPU time
(utime + stime from ``/proc/<pid>/stat``). The figure of merit is the least
busy worker's CPU time over the busiest one's, per start; the worst start
counts, because a pinned worker cannot borrow its idle neighbour's core.

    python -m loadtests.balance                       # balanced worker vs plain gthread
    python -m loadtests.balance --worker-class server_hooks.worker.BalancedThreadWorker
    python -m loadtests.balance --connections 64 --rate 1200 --no-pin
    python -m loadtests.balance --bid        # the real bid path (connections per worker unseen)

The server is ``bidder serve`` (same Gunicorn configuration, hooks, slots,
pinning and worker class as the bid server) serving :func:`app`, a small
CPU-bound WSGI app answering its worker's pid, so which worker holds which
connection is visible too.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from loadtests.stack import Server

BALANCED = "server_hooks.worker.BalancedThreadWorker"
TICKS = os.sysconf("SC_CLK_TCK")
THRESHOLD = 0.6


def app(environ, start_response):
    """A request worth ~0.2 ms of CPU; the body is the serving worker's pid."""
    total = 0
    for i in range(3000):
        total += i * i
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def hello_request(conn: http.client.HTTPConnection) -> tuple[http.client.HTTPResponse, int]:
    conn.request("GET", "/")
    response = conn.getresponse()
    return response, int(response.read())


def bid_requester(count: int = 256):
    """POST real OpenRTB requests (``loadtests.traffic``); the bid app does not say its pid."""
    from loadtests.traffic import generate

    requests = generate(count)
    serial = iter(range(1 << 62))

    def send(conn: http.client.HTTPConnection) -> tuple[http.client.HTTPResponse, int | None]:
        request = requests[next(serial) % count]
        conn.request("POST", "/openrtb2/bid", body=request.body, headers=request.headers)
        response = conn.getresponse()
        response.read()
        return response, None

    return send


def drive(port: int, connections: int, seconds: float, rate: float, send=hello_request,
          ) -> dict[str, object]:
    """Open ``connections`` keep-alive connections at once and send ``rate`` requests/s over them.

    Every connection carries the same share of the rate, paced (a late response
    delays only its own connection's next request), as an exchange spreads its
    traffic over its pool: a worker's work is then proportional to the
    connections it holds, which is what this measures. Returns requests per
    worker pid and which pid each connection was on at the end. Like any
    HTTP/1.1 client pool, a connection the server closes is reopened.
    """
    interval = connections / rate
    start = threading.Barrier(connections)
    stop = time.monotonic() + seconds
    served: list[dict[int, int]] = [{} for _ in range(connections)]
    last: list[int | None] = [None] * connections
    reconnects = [0] * connections
    statuses: list[dict[int, int]] = [{} for _ in range(connections)]

    def loop(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        start.wait()
        conn.connect()
        due = time.monotonic() + interval * index / connections  # staggered, not in lockstep
        while due < stop:
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            due += interval
            response, pid = send(conn)
            statuses[index][response.status] = statuses[index].get(response.status, 0) + 1
            if pid is not None:
                served[index][pid] = served[index].get(pid, 0) + 1
                last[index] = pid
            if response.will_close:
                reconnects[index] += 1
                conn.close()
        conn.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    requests: dict[int, int] = {}
    for per_conn in served:
        for pid, count in per_conn.items():
            requests[pid] = requests.get(pid, 0) + count
    holding: dict[int, int] = {}
    for pid in last:
        if pid is not None:
            holding[pid] = holding.get(pid, 0) + 1
    status: dict[int, int] = {}
    for per_conn in statuses:
        for code, count in per_conn.items():
            status[code] = status.get(code, 0) + count
    return {"requests": requests, "connections_at_end": holding, "reconnects": sum(reconnects),
            "status": status}


def one_start(args: argparse.Namespace, worker_class: str) -> dict[str, object]:
    """Boot a fresh server, load it, measure each worker's CPU time, stop it."""
    workdir = tempfile.mkdtemp(prefix="bidder-balance-")
    server = Server(["--workers", str(args.workers), "--worker-class", worker_class,
                     "--pin" if args.pin else "--no-pin", "--log-level", "warning"], "none",
                    workdir, app=None if args.bid else "loadtests.balance:app")
    try:
        server.start(timeout_s=20, settle_s=0, workers=args.workers)
        pids = server.workers()
        time.sleep(args.settle)
        before = {pid: cpu_seconds(pid) for pid in pids}
        load = drive(server.port, args.connections, args.seconds, args.rate,
                     bid_requester() if args.bid else hello_request)
        used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = min(used.values()) / max(used.values()) if max(used.values()) > 0 else 0.0
    return {"cpu_s": {str(pid): round(t, 3) for pid, t in used.items()},
            "requests": {str(pid): load["requests"].get(pid, 0) for pid in pids},
            "connections_at_end": {str(pid): load["connections_at_end"].get(pid, 0)
                                   for pid in pids},
            "reconnects": load["reconnects"], "ratio": round(ratio, 3),
            "status": {str(k): v for k, v in sorted(load["status"].items())},
            "rate": round(sum(load["status"].values()) / args.seconds, 1)}


def plot(report: dict[str, object], args: argparse.Namespace, path: Path) -> None:
    """One dot per fresh start: least over most busy worker's CPU time, per worker class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for x, (worker_class, result) in enumerate(report.items()):
        ratios = [s["ratio"] for s in result["starts"]]
        ax.scatter([x + (i - len(ratios) / 2) * 0.02 for i in range(len(ratios))], ratios,
                   s=18, alpha=0.8)
    ax.axhline(THRESHOLD, color="red", linestyle="--", linewidth=1)
    ax.text(len(report) - 0.5, THRESHOLD + 0.02, f"target >= {THRESHOLD}", color="red",
            ha="right", fontsize=8)
    ax.set_xticks(range(len(report)), [c.rsplit(".", 1)[-1] for c in report])
    ax.set_xlim(-0.5, len(report) - 0.5)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("least / most busy worker CPU time")
    ax.set_title(f"{args.workers} workers, {args.connections} keep-alive connections, "
                 f"{'pinned' if args.pin else 'unpinned'}, {len(next(iter(report.values()))['starts'])} "
                 "fresh starts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


def measure(args: argparse.Namespace) -> int:
    classes = args.worker_class or [BALANCED, "gthread"]
    report: dict[str, object] = {}
    for worker_class in classes:
        starts = []
        for n in range(args.starts):
            result = one_start(args, worker_class)
            starts.append(result)
            print(f"{worker_class} start {n + 1}/{args.starts}: ratio {result['ratio']:.2f} "
                  f"cpu_s {list(result['cpu_s'].values())} "
                  f"conns {list(result['connections_at_end'].values()) if not args.bid else '?'} "
                  f"reconnects {result['reconnects']} req/s {result['rate']} "
                  f"status {result['status']}", file=sys.stderr, flush=True)
        ratios = [s["ratio"] for s in starts]
        report[worker_class] = {"min_ratio": min(ratios), "median_ratio": statistics.median(ratios),
                                "starts_below_threshold": sum(r < THRESHOLD for r in ratios),
                                "starts": starts}
    summary = {k: {key: v[key] for key in ("min_ratio", "median_ratio", "starts_below_threshold")}
               for k, v in report.items()}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"workers": args.workers, "connections": args.connections, "seconds": args.seconds,
             "pin": args.pin, "results": report}, indent=2))
    if args.plot:
        plot(report, args, Path(args.plot))
    balanced = report.get(BALANCED)
    return 1 if balanced and balanced["min_ratio"] < THRESHOLD else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.balance", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--starts", type=int, default=10, help="fresh server starts per class")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per start")
    parser.add_argument("--rate", type=float, default=600.0,
                        help="requests per second over all connections (keep it well under "
                             "the capacity of one worker, so a 7:1 split still fits)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds between the server answering and the connections opening")
    parser.add_argument("--worker-class", action="append",
                        help="worker class to measure (repeatable); default: balanced and gthread")
    parser.add_argument("--bid", action="store_true",
                        help="serve the real bid app (bundled model, no feature store) and POST "
                             "OpenRTB requests instead of the pid-echo app")
    parser.add_argument("--plot", help="write a PNG of every start's ratio here")
    parser.add_argument("--json", help="write every start's numbers here")
    args = parser.parse_args(argv)
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
