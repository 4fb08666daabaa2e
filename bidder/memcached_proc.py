"""Local processes for the demo, the harnesses and the tests: free loopback ports, an
embedded memcached, and stopping a child politely before forcefully."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from types import TracebackType

INSTALL_HINT = (
    "memcached is not installed. Install it with 'sudo apt-get install -y memcached' "
    "(Debian/Ubuntu), 'sudo dnf install -y memcached' (Fedora/RHEL) or 'brew install memcached' "
    "(macOS), or point the bidder at a running server with --memcached HOST:PORT."
)


class MemcachedNotFound(RuntimeError):
    """No memcached binary on PATH."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts a TCP connection, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
            time.sleep(0.02)


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (a Gunicorn master stops its workers gracefully), then SIGKILL after ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class EmbeddedMemcached:
    """``memcached -l 127.0.0.1 -U 0 -p PORT`` as a context manager.

    >>> with EmbeddedMemcached() as mc:
    ...     mc.address  # '127.0.0.1:PORT'
    """

    def __init__(self, port: int | None = None, memory_mb: int = 256, threads: int = 2) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.memory_mb = memory_mb
        self.threads = threads
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedMemcached":
        binary = shutil.which("memcached")
        if binary is None:
            raise MemcachedNotFound(INSTALL_HINT)
        cmd = [binary, "-l", self.host, "-U", "0", "-p", str(self.port),
               "-m", str(self.memory_mb), "-t", str(self.threads)]
        if _running_as_root():
            cmd += ["-u", "nobody"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
        self.process = None

    def __enter__(self) -> "EmbeddedMemcached":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _running_as_root() -> bool:
    return os.geteuid() == 0
