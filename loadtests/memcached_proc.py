"""Local processes for the demo, the harnesses and the tests: free loopback ports, an
embedded memcached (TCP on loopback or a Unix socket), and stopping a child politely before
forcefully."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

INSTALL_HINT = (
    "memcached is not installed. Install it with 'sudo apt-get install -y memcached' "
    "(Debian/Ubuntu), 'sudo dnf install -y memcached' (Fedora/RHEL) or 'brew install memcached' "
    "(macOS), or point the bidder at a running server with --memcached HOST:PORT (or unix:PATH)."
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


def wait_for_unix_socket(path: str, timeout: float = 10.0) -> None:
    """Block until the Unix socket ``path`` accepts a connection, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.2)
                s.connect(path)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {path} after {timeout:.0f} s")
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
    """``memcached -l 127.0.0.1 -U 0 -p PORT`` (or, with ``unix_socket``, ``memcached -s PATH``
    in a private temporary directory) as a context manager.

    >>> with EmbeddedMemcached() as mc:
    ...     mc.address  # '127.0.0.1:PORT'
    >>> with EmbeddedMemcached(unix_socket=True) as mc:
    ...     mc.address  # 'unix:/tmp/bidder-memcached-XXXX/memcached.sock'
    """

    def __init__(self, port: int | None = None, memory_mb: int = 256, threads: int = 2,
                 unix_socket: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = None if unix_socket else port or free_port()
        self.socket_path: str | None = None  # set by start() when serving a Unix socket
        self.unix_socket = unix_socket
        self.memory_mb = memory_mb
        self.threads = threads
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """What ``--memcached`` takes: ``127.0.0.1:PORT`` or ``unix:PATH``."""
        if self.unix_socket:
            return f"unix:{self.socket_path}"
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedMemcached":
        binary = shutil.which("memcached")
        if binary is None:
            raise MemcachedNotFound(INSTALL_HINT)
        cmd = [binary, "-m", str(self.memory_mb), "-t", str(self.threads)]
        if self.unix_socket:
            directory = tempfile.mkdtemp(prefix="bidder-memcached-")
            if _running_as_root():  # memcached creates the socket after dropping to nobody
                os.chown(directory, pwd.getpwnam("nobody").pw_uid, -1)
            self.socket_path = os.path.join(directory, "memcached.sock")
            cmd += ["-s", self.socket_path, "-a", "0700"]  # the socket: this user only
        else:
            cmd += ["-l", self.host, "-U", "0", "-p", str(self.port)]
        if _running_as_root():
            cmd += ["-u", "nobody"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if self.socket_path:
                wait_for_unix_socket(self.socket_path)
            else:
                wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
        self.process = None
        if self.socket_path is not None:
            shutil.rmtree(os.path.dirname(self.socket_path), ignore_errors=True)
            self.socket_path = None

    def __enter__(self) -> "EmbeddedMemcached":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _running_as_root() -> bool:
    return os.geteuid() == 0
