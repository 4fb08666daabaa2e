"""The system under test for the harnesses: memcached, seeded users, a ``bidder serve`` process.

The A/B, the capacity search and the benchmark all start the real server as a
subprocess (``bidder serve ... --pid FILE``), wait for ``/readyz`` (admin listener), read the
master's and workers' counters from ``/proc`` and stop it with SIGTERM, the way
an operator would. CPU placement: on a machine with enough CPUs the server gets
its own set (``taskset``) and the load generator and memcached the rest; where
that is impossible it says so (``Placement.note``).
"""
from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.memcached_proc import free_port

MIN_CPUS_TO_SEPARATE = 4
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def reports_errors(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Turn a harness failure (a server that would not start, a generator that failed, a bad
    --mix) into one message and exit status 1 instead of a traceback."""
    def wrap(run: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(run)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            try:
                return run(*args, **kwargs)
            except (RuntimeError, TimeoutError, OSError, ValueError,
                    subprocess.TimeoutExpired) as exc:
                print(f"bidder {command}: {exc}", file=sys.stderr)
                return 1
        return wrapper
    return wrap


@dataclass(frozen=True)
class Placement:
    """Which CPUs the server and the load generator (with memcached) may use."""

    server_cpus: str | None
    generator_cpus: str | None
    separated: bool
    note: str

    @classmethod
    def plan(cls, cpus: list[int] | None = None) -> "Placement":
        cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
        if len(cpus) < MIN_CPUS_TO_SEPARATE:
            return cls(None, None, False,
                       f"only {len(cpus)} CPUs: the load generator and memcached share the "
                       "server's CPUs, so the numbers are not representative of a many-core server "
                       "(on a pinned arm the generator competes with the pinned workers)")
        n_gen = max(1, len(cpus) // 4)
        gen, server = cpus[-n_gen:], cpus[:-n_gen]
        return cls(_cpulist(server), _cpulist(gen), True,
                   f"server on CPUs {_cpulist(server)}; load generator and memcached on "
                   f"{_cpulist(gen)} (taskset)")

    def confine_helper(self, pid: int) -> None:
        """Keep a helper process (memcached) on the load generator's CPUs, off the server's."""
        if self.generator_cpus:
            os.sched_setaffinity(pid, {int(c) for c in self.generator_cpus.split(",")})


def _cpulist(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def seed_users(address: str, n: int) -> int:
    """Load ``n`` synthetic users into memcached at ``address`` with the bidder's own seeding."""
    from bidder.seed import seed_users as bidder_seed
    return bidder_seed(address, n, progress=False)


@dataclass(frozen=True)
class ProcCounters:
    """Cumulative counters of a set of processes (all their threads) at one instant."""

    cpu_s: float
    migrations: int
    voluntary: int
    involuntary: int

    def __sub__(self, other: "ProcCounters") -> "ProcCounters":
        return ProcCounters(self.cpu_s - other.cpu_s, self.migrations - other.migrations,
                            self.voluntary - other.voluntary, self.involuntary - other.involuntary)


def read_counters(pids: list[int]) -> ProcCounters:
    """utime+stime (/proc/PID/stat), se.nr_migrations (/proc/PID/task/*/sched) and
    voluntary/involuntary context switches (/proc/PID/task/*/status), summed over ``pids``."""
    cpu = 0.0
    migrations = voluntary = involuntary = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cpu += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
            for task in Path(f"/proc/{pid}/task").iterdir():
                for line in (task / "sched").read_text().splitlines():
                    if line.startswith("se.nr_migrations"):
                        migrations += int(line.split(":")[1])
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split(":")[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split(":")[1])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker that exited: its counters are gone
    return ProcCounters(cpu, migrations, voluntary, involuntary)


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine so far, from the first line of /proc/stat.

    Busy minus what the server and the generator used is the noise other processes made.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK, steal / _CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the Gunicorn workers of a master)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return sorted(out)


def get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """``bidder serve`` (or another WSGI app through it) as a subprocess with a pid file.

    The one launcher of ``bidder serve`` for the harnesses, the demo and the tests: free
    loopback ports for the bid and admin listeners, the pid, log and ledger files in
    ``workdir``, ready once ``/readyz`` answers 200 on the admin listener (and, with
    ``settle_s``, the worker set held still that long), stopped with SIGTERM as an operator
    would.
    """

    def __init__(self, serve_args: list[str], memcached: str, workdir: str,
                 cpus: str | None = None, app: str | None = None,
                 env: dict[str, str] | None = None, python: str = sys.executable,
                 cwd: str | None = None) -> None:
        self.python = python  # the interpreter (its environment) that runs bidder serve
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_port = free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"  # /metrics, /readyz
        self.workdir = workdir
        self.pidfile = os.path.join(workdir, f"server-{self.port}.pid")
        self.logfile = os.path.join(workdir, f"server-{self.port}.log")
        self.ledger = os.path.join(workdir, f"server-{self.port}.ledger.sqlite3")
        self.serve_args = serve_args
        self.memcached = memcached
        self.cpus = cpus
        self.app = app
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [self.python, "-m", "bidder", "serve", "--bind", f"127.0.0.1:{self.port}",
                "--admin-bind", f"127.0.0.1:{self.admin_port}", "--pid", self.pidfile,
                "--memcached", self.memcached, *self.serve_args]
        if self.app:
            argv += ["--app", self.app]
        if "--ledger" not in self.serve_args:  # never write into the caller's directory
            argv += ["--ledger", self.ledger]
        return (["taskset", "-c", self.cpus] if self.cpus else []) + argv

    def launch(self) -> "Server":
        """Start the process; do not wait for it (``start`` does)."""
        with open(self.logfile, "ab") as logf:
            self.process = subprocess.Popen(self.argv(), stdout=logf, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.cwd,
                                            env={**os.environ, **self.env} if self.env else None)
        return self

    def start(self, timeout_s: float = 60.0, settle_s: float = 0.5,
              workers: int = 1) -> "Server":
        """Launch and wait until ready: ``/readyz`` answers 200, at least ``workers`` workers
        run and the worker set has not changed for ``settle_s`` (0: as soon as it answers)."""
        self.launch()
        deadline = time.monotonic() + timeout_s
        seen: list[int] = []
        steady_since = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: "
                                   f"{shlex.join(self.argv())}\n{self.log_tail()}")
            try:
                status, _ = get(self.admin_url + "/readyz")
            except OSError:
                status = 0
            running = self.workers()
            now = time.monotonic()
            if status == 200 and len(running) >= workers and (running == seen or not settle_s):
                steady_since = now if steady_since is None else steady_since
                if now - steady_since >= settle_s:
                    return self
            else:
                steady_since = None
            seen = running
            time.sleep(0.1 if settle_s else 0.05)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s:.0f} s: {shlex.join(self.argv())}\n"
                           f"{self.log_tail()}")

    @property
    def master_pid(self) -> int:
        return int(Path(self.pidfile).read_text().strip())

    def workers(self) -> list[int]:
        try:
            return children(self.master_pid)
        except (FileNotFoundError, ValueError):
            return []

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.logfile).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def workdir(out: str | None) -> str:
    """``out`` (created) or a fresh temporary directory."""
    if out:
        os.makedirs(out, exist_ok=True)
        return out
    return tempfile.mkdtemp(prefix="bidder-loadtest-")
