"""A loopback TCP relay that can hold back replies and cut connections.

The network is the seam between agent and server; this relay lets a test make
that seam misbehave (lost acknowledgements, dropped connections) between the
real agent and the real server.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class FaultyRelay:
    """Relays 127.0.0.1:<port> to `target`; `hold_replies()` swallows server→client bytes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._hold = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold_replies(self) -> None:
        """Swallow server→client bytes until the next `cut()` (the stream is then unusable)."""
        self._hold.set()

    def cut(self) -> None:
        """Close every open connection and stop holding; new connections relay normally."""
        with self._lock:
            conns, self._conns = self._conns, []
            self._hold.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._closed.is_set():  # closing the listener does not wake a blocked accept(): refuse here
                client.close()
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, is_reply: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if is_reply and self._hold.is_set():
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()
