"""A lean load generator: open loop at a fixed rate, or closed loop for maximum throughput.

Open loop is how exchanges behave: request *i* is due at ``t0 + i/rate`` whatever
happened to the previous ones, and its latency is counted from that intended
time, so a stalled server is charged for the queue it causes (no coordinated
omission). Closed loop keeps ``connections`` keep-alive connections busy back
to back and reports the throughput the server reaches.

It runs as its own process (``python -m loadtests.openloop ...``) so the A/B,
the capacity search and the benchmark can place it on CPUs of their choosing
(``taskset``) and it never shares a GIL with the harness. It is gevent +
geventhttpclient, the client of Locust's ``FastHttpUser`` without Locust's
per-request bookkeeping, which lets one core offer several thousand requests
per second.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loadtests import stats, traffic

BID_PATH = "/openrtb2/bid"


@dataclass
class Result:
    """What one load run observed. ``histogram`` holds the latencies of 200/204 answers."""

    mode: str
    offered_rps: float | None
    duration_s: float
    elapsed_s: float = 0.0
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    histogram: Any = field(default_factory=stats.new_histogram)
    late_starts: int = 0  # open loop: requests that left late (> 1 ms; raw engine: > LATE_S)
    cpu_s: float = 0.0  # this generator's own CPU time while measuring: is it the bottleneck?

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0) + self.statuses.get(204, 0)

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    def as_dict(self) -> dict[str, Any]:
        ok = self.ok
        return {
            "mode": self.mode, "offered_rps": self.offered_rps, "duration_s": self.duration_s,
            "elapsed_s": self.elapsed_s, "sent": self.sent, "ok": ok, "failed": self.failed,
            "achieved_rps": ok / self.elapsed_s if self.elapsed_s else 0.0,
            "nobid_share": self.statuses.get(204, 0) / ok if ok else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors), "late_starts": self.late_starts,
            "generator_cpu_s": self.cpu_s,
            "generator_utilisation": self.cpu_s / self.elapsed_s if self.elapsed_s else 0.0,
            "latency": stats.summary_ms(self.histogram), "histogram": stats.encode(self.histogram),
        }


def generate_load(url: str, requests: Sequence[traffic.BidRequest], duration_s: float,
                  rate: float | None, connections: int, warmup_s: float = 0.0,
                  timeout_s: float = 2.0, drain_s: float = 5.0) -> Result:
    """Send ``requests`` (cycled) for ``duration_s``: open loop at ``rate``/s, or closed when None.

    Runs a warm-up of ``warmup_s`` at the same rate first and discards it.
    """
    import gevent
    from gevent.pool import Pool
    from geventhttpclient import HTTPClient

    parts = urlsplit(url)
    client = HTTPClient(parts.hostname, parts.port or 80, concurrency=connections,
                        connection_timeout=timeout_s, network_timeout=timeout_s)
    path = parts.path.rstrip("/") + BID_PATH
    clock = time.perf_counter
    n_req = len(requests)

    def one(index: int, intended: float, result: Result | None) -> None:
        req = requests[index % n_req]
        try:
            response = client.request("POST", path, body=req.body, headers=req.headers)
            response.read()
            status = response.status_code
            response.release()
        except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
            if result is not None:
                result.errors[type(exc).__name__] += 1
            return
        if result is None:
            return
        result.statuses[status] += 1
        if status in (200, 204):
            stats.record_us(result.histogram, (clock() - intended) * 1e6)

    def open_phase(seconds: float, result: Result | None, first: int) -> int:
        pool = Pool()
        t0 = clock()
        total = int(seconds * rate)
        i = 0
        while i < total:
            now = clock()
            due = t0 + i / rate
            if due > now:
                gevent.sleep(due - now)
                continue
            while i < total and t0 + i / rate <= now:  # everything due now, even if we are late
                intended = t0 + i / rate
                if result is not None:
                    result.sent += 1
                    result.late_starts += now - intended > 0.001
                pool.spawn(one, first + i, intended, result)
                i += 1
        if result is not None:
            result.elapsed_s = clock() - t0
        drained = pool.join(timeout=drain_s)
        if result is not None:
            result.elapsed_s = max(result.elapsed_s, min(clock() - t0, seconds + drain_s))
            if not drained:
                result.errors["not answered before drain timeout"] += len(pool)
                pool.kill(block=False)
        return first + i

    def closed_phase(seconds: float, result: Result | None, first: int) -> None:
        stop_at = clock() + seconds
        counter = iter(range(first, 1 << 62))

        def loop() -> None:
            while clock() < stop_at:
                if result is not None:
                    result.sent += 1
                start = clock()
                one(next(counter), start, result)

        t0 = clock()
        gevent.joinall([gevent.spawn(loop) for _ in range(connections)])
        if result is not None:
            result.elapsed_s = clock() - t0

    result = Result("open" if rate else "closed", rate, duration_s)
    try:
        if rate:
            nxt = open_phase(warmup_s, None, 0) if warmup_s > 0 else 0
            cpu0 = time.process_time()
            open_phase(duration_s, result, nxt)
        else:
            if warmup_s > 0:
                closed_phase(warmup_s, None, 0)
            cpu0 = time.process_time()
            closed_phase(duration_s, result, 0)
        result.cpu_s = time.process_time() - cpu0
    finally:
        client.close()
    return result


def command(url: str, duration_s: float, rate: float | None, connections: int, out: str,
            warmup_s: float = 0.0, mix: str = "", users: int = 10_000, seed: int = 0,
            n_requests: int = 4096, cpus: str | None = None, engine: str = "gevent") -> list[str]:
    """The argv that runs this generator as a process, under ``taskset -c CPUS`` when given."""
    argv = [sys.executable, "-m", "loadtests.openloop", "--url", url, "--duration", str(duration_s),
            "--connections", str(connections), "--warmup", str(warmup_s), "--mix", mix,
            "--users", str(users), "--seed", str(seed), "--requests", str(n_requests),
            "--engine", engine, "--out", out]
    if rate:
        argv += ["--rate", str(rate)]
    if cpus:
        argv = ["taskset", "-c", cpus] + argv
    return argv


def run_process(argv: list[str], out: str, timeout_s: float) -> dict[str, Any]:
    """Run a generator process built by ``command`` and return its result dict."""
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    with open(out) as f:
        return json.load(f)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.openloop",
                                description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="Server base URL, e.g. http://127.0.0.1:8080.")
    p.add_argument("--rate", type=float, default=None,
                   help="Open loop: requests per second. Absent: closed loop.")
    p.add_argument("--duration", type=float, default=10.0, help="Measured seconds.")
    p.add_argument("--warmup", type=float, default=0.0, help="Unmeasured seconds first.")
    p.add_argument("--connections", type=int, default=64, help="Keep-alive connections.")
    p.add_argument("--timeout", type=float, default=2.0, help="Per-request timeout, s.")
    p.add_argument("--mix", default="", help="Traffic mix, NAME=VALUE,... (loadtests.traffic.Mix).")
    p.add_argument("--users", type=int, default=10_000, help="Users seeded in memcached.")
    p.add_argument("--seed", type=int, default=0, help="Traffic seed.")
    p.add_argument("--requests", type=int, default=4096, help="Distinct pre-built requests.")
    p.add_argument("--engine", choices=("gevent", "raw"), default="gevent",
                   help="gevent: geventhttpclient, Locust's fast client; raw: plain sockets and "
                        "one epoll (loadtests.rawload), about a fifth of the CPU per request, "
                        "for rates past the server's capacity on a shared machine.")
    p.add_argument("--out", default="-", help="Result JSON file ('-' = stdout).")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.engine == "gevent":
        from gevent import monkey
        monkey.patch_all()
        engine = generate_load
    else:
        from loadtests.rawload import generate_load as engine
    try:
        mix = traffic.Mix.parse(f"users={args.users}," + args.mix)
    except ValueError as exc:
        parser.error(str(exc))
    requests = traffic.generate(args.requests, mix, args.seed)
    result = engine(args.url, requests, args.duration, args.rate, args.connections,
                    args.warmup, args.timeout).as_dict()
    text = json.dumps(result)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
    lat = result["latency"]
    print(f"openloop: {result['mode']} sent={result['sent']} ok={result['ok']} "
          f"failed={result['failed']} achieved={result['achieved_rps']:.0f}/s "
          f"p50={lat['p50_ms']:.2f}ms p99={lat['p99_ms']:.2f}ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
