"""Hardware counters of the server's workers with ``perf stat``, when this machine allows it.

Many VMs and containers expose no PMU: ``perf stat`` then runs and exits 0
but prints ``<not supported>`` for every hardware event. ``probe()`` tells
the two cases apart so a report says "unavailable, because ..." instead of 0.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass

EVENTS = ("cycles", "instructions", "cache-misses")


@dataclass(frozen=True)
class Availability:
    usable: bool
    reason: str


def probe() -> Availability:
    """Whether ``perf stat -e cycles,instructions,cache-misses`` counts anything here."""
    binary = shutil.which("perf")
    if binary is None:
        return Availability(False, "perf is not installed "
                                   "(apt-get install linux-perf / linux-tools)")
    try:
        proc = subprocess.run([binary, "stat", "-x", ",", "-e", ",".join(EVENTS), "true"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Availability(False, f"perf stat failed to run: {exc}")
    if proc.returncode != 0:
        return Availability(False, f"perf stat exited {proc.returncode}: "
                                   f"{proc.stderr.strip()[-200:]}")
    counts = _parse(proc.stderr)
    if not counts:
        return Availability(False, "perf stat runs but the hardware counters are <not supported> "
                                   "(no PMU exposed, typical of VMs)")
    return Availability(True, "perf stat " + ",".join(EVENTS))


class PerfStat:
    """``perf stat -p PIDS`` running in the background until ``stop()``."""

    def __init__(self, pids: list[int]) -> None:
        self.process = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", ",".join(EVENTS), "-p", ",".join(map(str, pids))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, float]:
        """Stop counting; {event: count} for each event that was counted."""
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return _parse(err)


def _parse(text: str) -> dict[str, float]:
    """Counts from ``perf stat -x ,`` output (value,unit,event,...); unsupported events left out."""
    counts: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3:
            continue
        # "cycles", "cycles:u" or a hybrid CPU's "cpu_core/cycles/"
        event = next((n for n in parts[2].replace(":", "/").split("/") if n in EVENTS), None)
        if event is not None:
            try:
                counts[event] = float(parts[0])
            except ValueError:
                continue  # "<not supported>" / "<not counted>"
    return counts
