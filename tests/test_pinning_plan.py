"""Slot -> CPU planning on topologies given as data (SMT, NUMA, cpusets) and on a sysfs tree."""
from __future__ import annotations

import pytest

from server_hooks.pinning import CpuMapError, parse_cpu_map, plan_cpus
from server_hooks.topology import Topology, format_cpulist, parse_cpulist

# 4 cores x 2 threads, Linux numbering: sibling of CPU n is n + 4.
SMT = Topology.build([[0, 4], [1, 5], [2, 6], [3, 7]])
# 2 NUMA nodes x 2 cores x 2 threads.
NUMA = Topology.build([[0, 4], [1, 5], [2, 6], [3, 7]], nodes=[[0, 1, 4, 5], [2, 3, 6, 7]])


def slots(plan, n):
    return [plan.cpu_for(i) for i in range(n)]


def test_cpulist_round_trip():
    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("0-6:2") == [0, 2, 4, 6]
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpulist([5]) == "5"
    with pytest.raises(ValueError, match="'x' is not a CPU"):
        parse_cpulist("0,x")


def test_smt_physical_cores_before_siblings():
    plan = plan_cpus(range(8), SMT)
    assert slots(plan, 4) == [0, 1, 2, 3]  # one worker per physical core first
    assert slots(plan, 8) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_numa_nodes_alternate():
    plan = plan_cpus(range(8), NUMA)
    assert slots(plan, 2) == [0, 2]  # one per node
    assert slots(plan, 4) == [0, 2, 1, 3]  # every physical core, nodes even at each prefix
    assert set(slots(plan, 8)) == set(range(8))


def test_cpuset_subset_prefers_whole_cores():
    # A container given CPUs 1,2,5: CPU 1's sibling 5 is in the set, CPU 2's sibling 6 is not.
    plan = plan_cpus({1, 2, 5}, SMT)
    assert slots(plan, 3) == [1, 2, 5]
    assert set(slots(plan, 2)) == {1, 2}  # two different physical cores


def test_single_cpu_and_more_workers_than_cpus():
    assert slots(plan_cpus({3}, SMT), 3) == [3, 3, 3]
    plan = plan_cpus({0, 1}, Topology.build([[0], [1]]))
    assert slots(plan, 5) == [0, 1, 0, 1, 0]  # wraps evenly


def test_reserve_and_reserve_everything():
    plan = plan_cpus(range(4), Topology.build([[0], [1], [2], [3]]), reserve="0")
    assert plan.order == (1, 2, 3) and not plan.warnings
    plan = plan_cpus({0, 1}, Topology.build([[0], [1]]), reserve="0-1")
    assert plan.order == (0, 1)
    assert "leaves no CPU" in plan.warnings[0]
    with pytest.raises(CpuMapError, match="--reserve-cpus"):
        plan_cpus({0, 1}, SMT, reserve="zero")


def test_reserving_a_cpu_pushes_its_sibling_back():
    plan = plan_cpus(range(8), SMT, reserve="0")
    assert plan.order[:3] == (1, 2, 3)  # whole free cores first
    assert 4 in plan.order[3:]


def test_explicit_map_wins_and_is_validated():
    assert slots(plan_cpus({0, 1, 2, 3}, SMT, cpu_map="0=2,1=3"), 3) == [2, 3, 2]
    assert plan_cpus({0, 1, 2, 3}, SMT, cpu_map="3,1", reserve="3").order == (3, 1)
    with pytest.raises(CpuMapError, match=r"names CPU 5.*may only run on CPUs 0-3"):
        plan_cpus({0, 1, 2, 3}, SMT, cpu_map="0=1,1=5")
    with pytest.raises(CpuMapError, match="slots must be 0..1"):
        parse_cpu_map("0=1,2=3")
    with pytest.raises(CpuMapError, match="not SLOT=CPU"):
        parse_cpu_map("0=1,b=2")


def test_topology_from_sysfs_tree(tmp_path):
    """A copied sysfs: 2 cores x 2 threads on one package, two nodes."""
    layout = {0: ("0,2", 0), 1: ("1,3", 1), 2: ("0,2", 0), 3: ("1,3", 1)}
    for cpu, (siblings, _node) in layout.items():
        topo = tmp_path / "devices/system/cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(siblings + "\n")
        (topo / "physical_package_id").write_text("0\n")
    for node, cpus in ((0, "0,2"), (1, "1,3")):
        path = tmp_path / "devices/system/node" / f"node{node}"
        path.mkdir(parents=True)
        (path / "cpulist").write_text(cpus + "\n")
    topology = Topology.from_sysfs(tmp_path)
    assert topology.get(2).core == 0 and topology.get(3).core == 1
    assert topology.get(1).node == 1
    assert plan_cpus(range(4), topology).order == (0, 1, 2, 3)


def test_topology_without_sysfs_degrades(tmp_path):
    (tmp_path / "devices/system/cpu/cpu0").mkdir(parents=True)
    (tmp_path / "devices/system/cpu/cpu1").mkdir(parents=True)
    topology = Topology.from_sysfs(tmp_path)
    assert topology.get(1).core == 1 and topology.get(1).node == 0
    assert plan_cpus({0, 1}, topology).order == (0, 1)


def test_this_machine():
    import os
    topology = Topology.from_sysfs()
    allowed = os.sched_getaffinity(0)
    assert set(plan_cpus(allowed, topology).order) == allowed
