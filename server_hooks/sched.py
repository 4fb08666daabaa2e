"""Per-task EEVDF slice (Linux >= 6.12) through ``sched_setattr``, and kernel-era detection.

Since 6.12 a SCHED_OTHER task may ask for its own time slice: ``sched_runtime``
of ``sched_setattr`` becomes ``se.slice`` (clamped by the kernel to 0.1-100 ms),
no privilege needed. Python has no binding, so this calls the syscall through
ctypes. Older kernels accept the call and ignore the runtime, which is why the
result is read back from ``/proc/self/sched``.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re

# struct sched_attr (include/uapi/linux/sched/types.h); SCHED_ATTR_SIZE_VER1 = 56 adds the
# util clamps, VER0 = 48 is what kernels before 5.3 know.
SCHED_ATTR_SIZE_VER0 = 48
SCHED_ATTR_SIZE_VER1 = 56
SCHED_OTHER = 0
SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "arm64": 274}
SLICE_KERNEL = (6, 12)  # first kernel honouring sched_runtime as the fair slice


class SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``platform.release()`` (or the given release string)."""
    match = re.match(r"(\d+)\.(\d+)", release if release is not None else platform.release())
    if not match:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return int(match.group(1)), int(match.group(2))


def set_slice(slice_ns: int, pid: int = 0) -> None:
    """Ask the kernel for an EEVDF slice of ``slice_ns`` for ``pid`` (0 = the caller).

    Keeps the task's nice value (sched_setattr would otherwise reset it to 0).
    Raises OSError when the syscall fails or this architecture has no number for it.
    """
    number = SYS_SCHED_SETATTR.get(platform.machine())
    if number is None:
        raise OSError(f"sched_setattr syscall number unknown for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    nice = os.getpriority(os.PRIO_PROCESS, pid)
    for size in (SCHED_ATTR_SIZE_VER1, SCHED_ATTR_SIZE_VER0):
        attr = SchedAttr(size=size, sched_policy=SCHED_OTHER, sched_nice=nice,
                         sched_runtime=int(slice_ns))
        if libc.syscall(number, pid, ctypes.byref(attr), 0) == 0:
            return
        err = ctypes.get_errno()
        if err != 7:  # E2BIG: the kernel predates this struct size, retry the older one
            break
    raise OSError(err, f"sched_setattr(SCHED_OTHER, runtime={slice_ns}): {os.strerror(err)}")


def read_slice(pid: int | str = "self") -> int | None:
    """``se.slice`` in ns from ``/proc/<pid>/sched`` (None if the kernel does not show it)."""
    try:
        with open(f"/proc/{pid}/sched") as f:
            for line in f:
                if line.startswith("se.slice"):
                    return int(float(line.split(":", 1)[1]))
    except (OSError, ValueError):
        return None
    return None


def apply_slice(slice_ms: float, release: str | None = None) -> tuple[int | None, str | None]:
    """Set this process's slice; return (the slice the kernel now reports, a warning or None)."""
    wanted = int(round(slice_ms * 1_000_000))
    version = kernel_version(release)
    try:
        set_slice(wanted)
    except OSError as exc:
        return read_slice(), f"--slice-ms {slice_ms:g}: {exc}; keeping the kernel's slice"
    got = read_slice()
    if got == wanted:
        return got, None
    if version < SLICE_KERNEL:
        return got, (f"--slice-ms {slice_ms:g} needs Linux >= 6.12 for per-task slices (this is "
                     f"{version[0]}.{version[1]}); set the host-wide granularity with "
                     f"`bidder tune apply` instead")
    return got, (f"--slice-ms {slice_ms:g}: asked for {wanted} ns, the kernel reports "
                 f"se.slice={got} (it clamps to 100000-100000000 ns)")
