"""CPU topology: which logical CPUs share a physical core, and which NUMA node each is on.

Read from sysfs (``/sys/devices/system/cpu/cpu*/topology`` and
``/sys/devices/system/node/node*/cpulist``) or given as data, so slot planning
can be tested on SMT, NUMA and cpuset layouts this machine does not have.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def parse_cpulist(text: str) -> list[int]:
    """Parse a Linux cpulist ("0-3,8,10-11", also "0-7:2" strides) into CPU ids, in order given.

    Raises ValueError naming the bad part, so a user typo in ``--reserve-cpus``
    says what was wrong.
    """
    cpus: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not match:
            raise ValueError(f"{part!r} is not a CPU number or range (expected e.g. 0-3,8)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        stride = int(match.group(3)) if match.group(3) is not None else 1
        if last < first or stride < 1:
            raise ValueError(f"{part!r} is an empty CPU range")
        cpus.extend(range(first, last + 1, stride))
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    """The compact cpulist of a CPU set: {0,1,2,3,8} -> "0-3,8"."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    start = prev = None
    for cpu in ids + [None]:
        if start is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


@dataclass(frozen=True)
class Cpu:
    """One logical CPU: its physical core (the smallest id among its SMT siblings) and node."""
    id: int
    core: int
    package: int = 0
    node: int = 0


class Topology:
    """Logical CPUs by id, with their physical core and NUMA node."""

    def __init__(self, cpus: Iterable[Cpu]):
        self.cpus: dict[int, Cpu] = {cpu.id: cpu for cpu in cpus}

    def __repr__(self) -> str:
        return f"Topology({sorted(self.cpus.values(), key=lambda c: c.id)!r})"

    def get(self, cpu: int) -> Cpu:
        """The CPU's entry; a CPU the topology does not know is its own core on node 0."""
        return self.cpus.get(cpu) or Cpu(cpu, core=cpu)

    @classmethod
    def build(cls, cores: Iterable[Iterable[int]], nodes: Iterable[Iterable[int]] | None = None,
              ) -> "Topology":
        """From data: ``cores`` lists the SMT siblings of each physical core, ``nodes`` the CPUs
        of each NUMA node (default: one node). ``build([[0, 2], [1, 3]])`` is 2 cores x 2 threads.
        """
        node_of: dict[int, int] = {}
        for index, members in enumerate(nodes or ()):
            for cpu in members:
                node_of[cpu] = index
        result = []
        for siblings in cores:
            siblings = sorted(siblings)
            for cpu in siblings:
                result.append(Cpu(cpu, core=siblings[0], node=node_of.get(cpu, 0)))
        return cls(result)

    @classmethod
    def from_sysfs(cls, root: str | os.PathLike = "/sys") -> "Topology":
        """Read the running machine's (or a copied sysfs tree's) topology.

        Missing files (containers, odd architectures) degrade to "every CPU is
        its own core on node 0" rather than failing: pinning still works, it
        just cannot prefer physical cores.
        """
        base = Path(root) / "devices" / "system"
        node_of: dict[int, int] = {}
        for node_dir in sorted(base.glob("node/node[0-9]*")):
            text = _read(node_dir / "cpulist")
            if text is not None:
                for cpu in parse_cpulist(text):
                    node_of[cpu] = int(node_dir.name[4:])
        cpus = []
        for cpu_dir in base.glob("cpu/cpu[0-9]*"):
            cpu = int(cpu_dir.name[3:])
            topo = cpu_dir / "topology"
            siblings_text = _read(topo / "thread_siblings_list") or _read(topo / "core_cpus_list")
            siblings = parse_cpulist(siblings_text) if siblings_text else [cpu]
            package = _read(topo / "physical_package_id")
            cpus.append(Cpu(cpu, core=min(siblings + [cpu]),
                            package=int(package) if package and package.lstrip("-").isdigit()
                            else 0,
                            node=node_of.get(cpu, 0)))
        return cls(cpus)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
