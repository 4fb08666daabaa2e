"""The directory the workers share their Prometheus samples through, set before the client loads.

prometheus_client chooses single- or multi-process values once, when it is imported: a
server whose client was imported before ``PROMETHEUS_MULTIPROC_DIR`` was set would answer
``/metrics`` with one worker's counts. So the CLI entry creates the directory before it
imports the ``serve`` command (this module imports nothing that imports the client), and
``bidder serve`` refuses to start without it.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def fresh() -> Iterator[str]:
    """A new, empty directory in ``PROMETHEUS_MULTIPROC_DIR`` for one server, removed when
    the process that made it leaves (the forked workers leave through these frames too)."""
    if "prometheus_client" in sys.modules and not os.environ.get(ENV):
        raise RuntimeError("prometheus_client was imported before its multiprocess directory "
                           "was set: /metrics would show one worker")
    path = tempfile.mkdtemp(prefix="bidder-metrics-")
    previous = os.environ.get(ENV)
    os.environ[ENV] = path
    owner = os.getpid()
    try:
        yield path
    finally:
        if os.getpid() == owner:  # only the master removes what its live workers write to
            shutil.rmtree(path, ignore_errors=True)
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous


def is_set() -> bool:
    return bool(os.environ.get(ENV))
