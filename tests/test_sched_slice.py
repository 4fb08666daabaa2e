"""The per-worker EEVDF slice (sched_setattr via ctypes), read back from /proc/<pid>/sched."""
from __future__ import annotations

import os

import pytest

from server_hooks import sched


def in_child(function) -> tuple[int, str]:
    """Run ``function`` in a forked child; its exit code and what it wrote."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            result = str(function())
            code = 0
        except BaseException as exc:  # report, never return into pytest from the child
            result, code = repr(exc), 1
        os.write(write, result.encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        output = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_kernel_version():
    assert sched.kernel_version("6.18.44-fc-v669") == (6, 18)
    assert sched.kernel_version("5.4.0-150-generic") == (5, 4)
    assert sched.kernel_version("6.1.0") < sched.SLICE_KERNEL <= sched.kernel_version("6.12.1")


@pytest.mark.skipif(sched.kernel_version() < sched.SLICE_KERNEL, reason="needs Linux >= 6.12")
def test_slice_is_set_in_a_child_process():
    def child():
        got, warning = sched.apply_slice(10)
        assert warning is None, warning
        return f"{got} {sched.read_slice(os.getpid())}"

    code, output = in_child(child)
    assert code == 0, output
    assert output == "10000000 10000000"


@pytest.mark.skipif(sched.kernel_version() < sched.SLICE_KERNEL, reason="needs Linux >= 6.12")
def test_slice_keeps_nice_and_reports_clamping():
    def child():
        os.nice(5)
        got, warning = sched.apply_slice(500)
        return f"{got} {os.getpriority(os.PRIO_PROCESS, 0)} {warning}"

    code, output = in_child(child)
    assert code == 0, output
    got, nice, warning = output.split(" ", 2)
    assert got == "100000000"  # the kernel clamps to 100 ms
    assert nice == str(os.getpriority(os.PRIO_PROCESS, 0) + 5)
    assert "clamps" in warning


def test_old_kernel_is_told_to_use_tune():
    def child():
        # A release string < 6.12 with a slice the kernel would not report as asked.
        return sched.apply_slice(0.05, release="6.6.0")[1]

    code, output = in_child(child)
    assert code == 0, output
    assert "needs Linux >= 6.12" in output and "bidder tune" in output
