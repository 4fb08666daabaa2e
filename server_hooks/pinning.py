"""Which CPU each worker slot runs on, and pinning a process there.

The plan is a pure function of the CPUs the master may use (its affinity, so
``taskset`` and cgroup cpusets are honoured), the topology and the options:
one CPU per physical core first, spread round-robin over NUMA nodes, SMT
siblings only after every core has one worker; more slots than CPUs wrap
around (slot i -> order[i % len(order)]). This is nginx's
``worker_cpu_affinity auto`` with SMT and NUMA awareness, or HAProxy's
``cpu-map`` when an explicit map is given.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from server_hooks.topology import Topology, format_cpulist, parse_cpulist


class CpuMapError(ValueError):
    """An explicit ``--cpu-map`` or ``--reserve-cpus`` that cannot be used as given."""


@dataclass(frozen=True)
class CpuPlan:
    """The CPU order slots are laid on, and what the planner had to say about it."""
    order: tuple[int, ...]
    warnings: tuple[str, ...] = field(default=())

    def cpu_for(self, slot: int) -> int:
        return self.order[slot % len(self.order)]


def parse_cpu_map(text: str) -> list[int]:
    """``"0=2,1=3"`` or ``"2,3"`` (or a cpulist ``"2-5"``) -> the CPU of slot 0, 1, ...

    The map form must name slots 0..k-1 each once, so no slot is left without a CPU.
    """
    text = text.strip()
    if "=" not in text:
        try:
            cpus = parse_cpulist(text)
        except ValueError as exc:
            raise CpuMapError(f"--cpu-map {text!r}: {exc}") from None
        if not cpus:
            raise CpuMapError("--cpu-map is empty; give e.g. '2,3' or '0=2,1=3'")
        return cpus
    by_slot: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        slot, sep, cpu = part.partition("=")
        if not (sep and slot.strip().isdigit() and cpu.strip().isdigit()):
            raise CpuMapError(f"--cpu-map {text!r}: {part!r} is not SLOT=CPU (e.g. 0=2,1=3)")
        if int(slot) in by_slot:
            raise CpuMapError(f"--cpu-map {text!r}: slot {int(slot)} is given twice")
        by_slot[int(slot)] = int(cpu)
    if sorted(by_slot) != list(range(len(by_slot))):
        raise CpuMapError(f"--cpu-map {text!r}: slots must be 0..{len(by_slot) - 1} each once "
                          f"(got {sorted(by_slot)})")
    return [by_slot[slot] for slot in range(len(by_slot))]


def spread_order(cpus: Iterable[int], topology: Topology) -> list[int]:
    """Order CPUs so every prefix spreads over NUMA nodes and physical cores.

    Round k takes the k-th SMT thread of every core; within a round, cores are
    dealt round-robin across nodes (node 0 core 0, node 1 core 0, node 0 core 1...),
    cores with all their threads usable before cores that share one with a reserved
    or foreign CPU.
    """
    cores: dict[tuple[int, int, int], list[int]] = {}
    for cpu in sorted(set(cpus)):
        info = topology.get(cpu)
        cores.setdefault((info.node, info.package, info.core), []).append(cpu)
    size: dict[tuple[int, int, int], int] = {}
    for info in topology.cpus.values():
        key = (info.node, info.package, info.core)
        size[key] = size.get(key, 0) + 1
    # Within a node, whole free cores first: a core whose sibling is reserved or outside the
    # cpuset shares its execution units with someone else.
    by_node: dict[int, list[list[int]]] = {}
    for key, threads in sorted(cores.items(),
                               key=lambda kv: (kv[0][0], size.get(kv[0], 1) > len(kv[1]), kv[0])):
        by_node.setdefault(key[0], []).append(threads)
    order: list[int] = []
    depth = max((len(t) for t in cores.values()), default=0)
    for thread in range(depth):
        lanes = [[t[thread] for t in node_cores if len(t) > thread]
                 for _node, node_cores in sorted(by_node.items())]
        for i in range(max((len(lane) for lane in lanes), default=0)):
            order.extend(lane[i] for lane in lanes if i < len(lane))
    return order


def plan_cpus(allowed: Iterable[int], topology: Topology, reserve: str | Iterable[int] = "",
              cpu_map: str | None = None) -> CpuPlan:
    """The slot -> CPU plan. An explicit ``cpu_map`` wins (checked against ``allowed``);
    otherwise ``allowed`` minus ``reserve`` in :func:`spread_order`.
    """
    allowed = set(allowed)
    if not allowed:
        raise CpuMapError("this process may run on no CPU at all (empty sched_getaffinity)")
    if cpu_map:
        order = parse_cpu_map(cpu_map)
        outside = sorted(set(order) - allowed)
        if outside:
            raise CpuMapError(
                f"--cpu-map {cpu_map!r} names CPU {format_cpulist(outside)}, but this process "
                f"may only run on CPUs {format_cpulist(allowed)} (its affinity: taskset/cgroup "
                f"cpuset). Pick CPUs from that set, or widen the affinity.")
        return CpuPlan(tuple(order))
    if isinstance(reserve, str):
        try:
            reserved = set(parse_cpulist(reserve))
        except ValueError as exc:
            raise CpuMapError(f"--reserve-cpus {reserve!r}: {exc}") from None
    else:
        reserved = set(reserve)
    usable = allowed - reserved
    warnings: tuple[str, ...] = ()
    if not usable:
        usable = allowed
        warnings = (f"--reserve-cpus {format_cpulist(reserved)} leaves no CPU of "
                    f"{format_cpulist(allowed)} for the workers; ignoring the reservation",)
    return CpuPlan(tuple(spread_order(usable, topology)), warnings)


def pin(cpus: int | Iterable[int]) -> str | None:
    """Pin the calling process to ``cpus`` (one CPU, or a set the kernel may move it within);
    the warning to log if the kernel refused, else None.

    A refusal (CPU offline, outside a cpuset changed after start, seccomp) must
    not stop the worker: it keeps serving on the CPUs it had.
    """
    wanted = {cpus} if isinstance(cpus, int) else set(cpus)
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        now = format_cpulist(os.sched_getaffinity(0))
        target = f"CPU {cpus}" if isinstance(cpus, int) else f"CPUs {format_cpulist(wanted)}"
        return (f"could not pin to {target} ({exc.strerror or exc}); serving unpinned on "
                f"CPUs {now}. Check --cpu-map/--reserve-cpus against `taskset -pc {os.getpid()}`.")
    return None
