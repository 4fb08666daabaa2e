"""``bidder tune check|apply|revert``: the host's scheduler and network knobs, by kernel era.

The CFS granularity knobs moved twice: sysctls under ``kernel.`` before 5.13,
debugfs files (``/sys/kernel/debug/sched/``) from 5.13, and EEVDF (6.6) replaced
min/wakeup granularity with one ``base_slice_ns``; from 6.12 a task may also
ask for its own slice, which ``bidder serve --slice-ms`` does per worker.
``check`` shows current vs recommended and exits 1 when anything differs;
``apply`` (root) saves what it changes to a state file so ``revert`` restores
exactly that. The roots (/proc/sys, debugfs, kernel release) are options so
the round trip can be tested on a directory tree instead of the host.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from server_hooks.sched import SLICE_KERNEL, kernel_version

# The recommended values, in one place. The scheduler numbers are the seed's claim (tuned's
# throughput-performance: min granularity 10 ms, wakeup granularity 15 ms) carried to each era
# (base_slice_ns is min_granularity_ns renamed in 6.6), plus a longer migration cost so warm
# tasks are not pulled to other CPUs. They are hypotheses for the A/B (`bidder ab`), which
# decides the defaults; the network values size queues and limits for many keep-alive
# connections and never lower what the host already has ("at least").
RECOMMENDED: dict[str, str] = {
    "sched_min_granularity_ns": "10000000",  # < 6.6: shortest slice before preemption
    "sched_wakeup_granularity_ns": "15000000",  # < 6.6: how much vruntime a waker must lead by
    "sched_migration_cost_ns": "5000000",  # all eras: a task ran this recently = cache-hot
    "base_slice_ns": "10000000",  # >= 6.6: EEVDF base slice (was min_granularity)
    # >= 6.12: per-worker slice (`bidder serve --slice-ms`). Off: the A/B of 10 ms against the
    # kernel default showed no significant CPU or latency difference (docs/ab/slice/report.md).
    "slice_ms": "off",
    "net.core.somaxconn": "65535",  # accept backlog cap (Gunicorn asks for 2048)
    "net.ipv4.tcp_max_syn_backlog": "65535",  # half-open connections during reconnect storms
    "net.ipv4.ip_local_port_range": "1024 65535",  # ephemeral ports for outgoing connections
    "fs.file-max": "2097152",  # system-wide open files
    "nofile": "65536",  # per-process open files (hard limit; serve raises soft to it)
}
DEBUGFS_HELP = "mount it with `mount -t debugfs none /sys/kernel/debug` (as root)"


@dataclass(frozen=True)
class Knob:
    """One tunable: where it lives, what it should be, and what it does."""
    name: str
    kind: str  # "sysctl" (under /proc/sys), "debugfs" (under debugfs), "rlimit", "slice"
    path: str  # relative to its root; unused for rlimit/slice
    recommended: str
    doc: str
    at_least: bool = False  # a limit: anything >= recommended is fine


@dataclass(frozen=True)
class Host:
    """Where the knobs are read and written; a temp tree in tests, the real host otherwise."""
    proc_sys: Path = Path("/proc/sys")
    debugfs: Path = Path("/sys/kernel/debug")
    release: str = platform.release()
    root: bool = os.geteuid() == 0

    @property
    def version(self) -> tuple[int, int]:
        return kernel_version(self.release)


def era(version: tuple[int, int]) -> str:
    if version < (5, 13):
        return "CFS, granularity as sysctls (< 5.13)"
    if version < (6, 6):
        return "CFS, granularity in debugfs (5.13-6.5)"
    if version < SLICE_KERNEL:
        return "EEVDF, base_slice_ns in debugfs (6.6-6.11)"
    return "EEVDF, base_slice_ns in debugfs + per-task slices (>= 6.12)"


def knobs(version: tuple[int, int]) -> list[Knob]:
    """The knobs that exist on a kernel of this version."""
    r = RECOMMENDED
    found: list[Knob] = []
    if version < (5, 13):
        found += [
            Knob("kernel.sched_min_granularity_ns", "sysctl", "kernel/sched_min_granularity_ns",
                 r["sched_min_granularity_ns"], "minimum slice a task runs before preemption"),
            Knob("kernel.sched_wakeup_granularity_ns", "sysctl",
                 "kernel/sched_wakeup_granularity_ns", r["sched_wakeup_granularity_ns"],
                 "a woken task preempts only if this far behind in vruntime"),
            Knob("kernel.sched_migration_cost_ns", "sysctl", "kernel/sched_migration_cost_ns",
                 r["sched_migration_cost_ns"], "tasks run this recently are cache-hot, not moved"),
        ]
    elif version < (6, 6):
        found += [
            Knob("sched/min_granularity_ns", "debugfs", "sched/min_granularity_ns",
                 r["sched_min_granularity_ns"], "minimum slice a task runs before preemption"),
            Knob("sched/wakeup_granularity_ns", "debugfs", "sched/wakeup_granularity_ns",
                 r["sched_wakeup_granularity_ns"],
                 "a woken task preempts only if this far behind in vruntime"),
            Knob("sched/migration_cost_ns", "debugfs", "sched/migration_cost_ns",
                 r["sched_migration_cost_ns"], "tasks run this recently are cache-hot, not moved"),
        ]
    else:
        found += [
            Knob("sched/base_slice_ns", "debugfs", "sched/base_slice_ns", r["base_slice_ns"],
                 "EEVDF slice of tasks that do not ask for their own"),
            Knob("sched/migration_cost_ns", "debugfs", "sched/migration_cost_ns",
                 r["sched_migration_cost_ns"], "tasks run this recently are cache-hot, not moved"),
        ]
    if version >= SLICE_KERNEL:
        found.append(Knob("per-worker slice", "slice", "", r["slice_ms"],
                          "set by each worker itself with `bidder serve --slice-ms MS` (no root); "
                          "kernel default recommended: 10 ms showed no gain in our A/B "
                          "(docs/ab/slice), measure yours with `bidder ab`"))
    found += [
        Knob("net.core.somaxconn", "sysctl", "net/core/somaxconn", r["net.core.somaxconn"],
             "cap on every listen backlog", at_least=True),
        Knob("net.ipv4.tcp_max_syn_backlog", "sysctl", "net/ipv4/tcp_max_syn_backlog",
             r["net.ipv4.tcp_max_syn_backlog"], "queued half-open connections", at_least=True),
        Knob("net.ipv4.ip_local_port_range", "sysctl", "net/ipv4/ip_local_port_range",
             r["net.ipv4.ip_local_port_range"], "ephemeral ports for outgoing connections"),
        Knob("fs.file-max", "sysctl", "fs/file-max", r["fs.file-max"],
             "open files, system-wide", at_least=True),
        Knob("nofile (hard limit)", "rlimit", "", r["nofile"],
             "open files per process; systemd LimitNOFILE= or limits.d (see server_hooks/host)",
             at_least=True),
    ]
    return found


@dataclass
class Reading:
    knob: Knob
    current: str | None  # None: could not be read
    problem: str = ""  # why it could not be read, and what to do

    @property
    def ok(self) -> bool:
        if self.knob.kind == "slice":
            return True
        if self.current is None:
            return False
        if self.knob.at_least:
            return int(self.current.split()[0]) >= int(self.knob.recommended.split()[0])
        return self.current == self.knob.recommended


def _file(host: Host, knob: Knob) -> Path:
    return (host.proc_sys if knob.kind == "sysctl" else host.debugfs) / knob.path


def _debugfs_problem(host: Host) -> str | None:
    """Why the scheduler's debugfs directory cannot be used, or None."""
    try:
        if (host.debugfs / "sched").is_dir():
            return None
    except PermissionError:
        return f"{host.debugfs} is readable by root only: run `sudo bidder tune check`"
    if os.path.ismount(host.debugfs):
        return f"{host.debugfs} has no sched/ (kernel built without CONFIG_SCHED_DEBUG?)"
    return f"debugfs is not mounted at {host.debugfs}: {DEBUGFS_HELP}"


def read(host: Host, knob: Knob) -> Reading:
    if knob.kind == "slice":
        return Reading(knob, "per worker")
    if knob.kind == "rlimit":
        return Reading(knob, str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    if knob.kind == "debugfs":
        problem = _debugfs_problem(host)
        if problem:
            return Reading(knob, None, problem)
    path = _file(host, knob)
    try:
        return Reading(knob, " ".join(path.read_text().split()))
    except PermissionError:
        return Reading(knob, None, f"{path} is readable by root only: run `sudo bidder tune check`")
    except FileNotFoundError:
        return Reading(knob, None, f"{path} does not exist on this kernel")
    except OSError as exc:
        return Reading(knob, None, f"cannot read {path}: {exc.strerror}")


def check(host: Host, out=sys.stdout) -> int:
    """Print current vs recommended; 0 when everything is as recommended, else 1."""
    print(f"kernel {host.release}: {era(host.version)}", file=out)
    print("running as root" if host.root else
          f"running as uid {os.geteuid()} (not root): values only root may read show as ?, "
          "apply/revert need root", file=out)
    readings = [read(host, knob) for knob in knobs(host.version)]
    width = max(len(r.knob.name) for r in readings)
    print(f"{'KNOB':<{width}}  {'CURRENT':>12}  {'RECOMMENDED':>12}  STATUS", file=out)
    for r in readings:
        if r.knob.kind == "slice":
            status = r.knob.doc
        elif r.current is None:
            status = r.problem
        else:
            status = "ok" if r.ok else ("below recommended" if r.knob.at_least else "differs")
        want = (">=" if r.knob.at_least else "") + r.knob.recommended
        print(f"{r.knob.name:<{width}}  {r.current or '?':>12}  {want:>12}  {status}", file=out)
    bad = [r for r in readings if not r.ok]
    if bad:
        print(f"{len(bad)} knob(s) not as recommended; `sudo bidder tune apply` sets what it can "
              f"(and `bidder tune revert` undoes it).", file=out)
    return 1 if bad else 0


def default_state_path(root: bool) -> Path:
    if root:
        return Path("/var/lib/bidder/tune-state.json")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "bidder" / "tune-state.json"


def apply(host: Host, state: Path, out=sys.stdout) -> int:
    """Set every settable knob to its recommendation; remember the old values in ``state``."""
    todo = [r for r in (read(host, k) for k in knobs(host.version))
            if not r.ok and r.knob.kind in ("sysctl", "debugfs")]
    if not host.root:
        for r in todo:
            print(f"would set {r.knob.name}: {r.current or '?'} -> {r.knob.recommended}"
                  + (f" ({r.problem})" if r.problem else ""), file=out)
        print("not root: nothing changed. Run `sudo bidder tune apply` to apply.", file=out)
        return 1
    saved: dict[str, str] = json.loads(state.read_text()) if state.exists() else {}
    failed = 0
    for r in todo:
        if r.current is None:
            print(f"skip {r.knob.name}: {r.problem}", file=out)
            failed += 1
            continue
        path = _file(host, r.knob)
        try:
            path.write_text(r.knob.recommended + "\n")
        except OSError as exc:
            print(f"cannot set {r.knob.name} ({path}): {exc.strerror}", file=out)
            failed += 1
            continue
        saved.setdefault(str(path), r.current)  # a second apply keeps the original value
        print(f"set {r.knob.name}: {r.current} -> {r.knob.recommended}", file=out)
    for r in (read(host, k) for k in knobs(host.version)):
        if r.knob.kind == "rlimit" and not r.ok:
            print(f"{r.knob.name} is {r.current}: not a host setting; install "
                  "server_hooks/host/limits.conf or LimitNOFILE= in the unit", file=out)
    if saved:
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"previous values saved to {state}; `bidder tune revert --state {state}` "
              "restores them", file=out)
    return 1 if failed else 0


def revert(host: Host, state: Path, out=sys.stdout) -> int:
    """Write back every value ``apply`` saved, then forget them."""
    if not state.exists():
        print(f"nothing to revert: no state file {state} (was `bidder tune apply` run with "
              "the same --state?)", file=out)
        return 0
    saved: dict[str, str] = json.loads(state.read_text())
    if not host.root:
        for path, value in saved.items():
            print(f"would restore {path} to {value}", file=out)
        print("not root: nothing changed. Run `sudo bidder tune revert`.", file=out)
        return 1
    left: dict[str, str] = {}
    for path, value in saved.items():
        try:
            Path(path).write_text(value + "\n")
            print(f"restored {path} to {value}", file=out)
        except OSError as exc:
            print(f"cannot restore {path} to {value}: {exc.strerror}", file=out)
            left[path] = value
    if left:
        state.write_text(json.dumps(left, indent=2) + "\n")
        return 1
    state.unlink()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("check", "apply", "revert"),
                        help="check: show current vs recommended (exit 1 if any differs); "
                             "apply: set them (root), saving the old values; revert: restore")
    parser.add_argument("--state", type=Path, default=None,
                        help="where apply saves the previous values; unset: "
                             "/var/lib/bidder/tune-state.json as root, else "
                             "$XDG_STATE_HOME/bidder/tune-state.json")
    parser.add_argument("--proc-sys", type=Path, default=Path("/proc/sys"),
                        help="sysctl tree (for tests and containers)")
    parser.add_argument("--debugfs", type=Path, default=Path("/sys/kernel/debug"),
                        help="debugfs mount point")
    parser.add_argument("--kernel-release", default=platform.release(),
                        help="kernel release deciding the era (for tests)")


def run(args: argparse.Namespace) -> int:
    host = Host(args.proc_sys, args.debugfs, args.kernel_release, os.geteuid() == 0)
    state = args.state or default_state_path(host.root)
    if args.action == "check":
        return check(host)
    if args.action == "apply":
        return apply(host, state)
    return revert(host, state)
