"""Misbehaving TCP peers for fault tests: a loopback server, a delaying proxy, garbage."""
from __future__ import annotations

import socket
import threading
import time


class LoopbackServer:
    """A TCP server on a free loopback port, one thread per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class DelayingProxy(LoopbackServer):
    """Forwards to ``upstream``, holding every answer for ``delay_s`` (a far or busy shard)."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream, self.delay_s = upstream, delay_s
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump, args=(server, conn, self.delay_s), daemon=True).start()
        self._pump(conn, server, 0.0)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()


class GarbageServer(LoopbackServer):
    """Answers every command with bytes that are not memcached's protocol (a broken proxy)."""

    def serve(self, conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                conn.sendall(b"HELLO THERE\r\n")
