"""Byte relays from a host socket to an address reachable only inside another network namespace.

Plain threads (the launcher is not a gevent process): one accepting thread per listener, and per
connection one thread that enters the namespace (``netns.enter``: setns applies to the calling
thread only), connects, and pumps guest->client while a second pumps client->guest. Half-closes
are passed on, so HTTP clients that shut down their sending side still get their answer. Failures
to reach the guest close the client's connection: the client sees a reset or EOF, never a hang.
"""

from __future__ import annotations

import socket
import threading

from gorb.services.launcher import netns

CONNECT_TIMEOUT = 5.0
CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def connect_in(ns_fd: int, address: tuple[str, int], timeout: float = CONNECT_TIMEOUT
               ) -> socket.socket:
    """A TCP connection to ``address`` made from inside the namespace open as ``ns_fd``.

    Runs the connect on a short-lived thread so the caller's namespace never changes.
    """
    sock = netns.call_in(ns_fd, lambda: socket.create_connection(address, timeout=timeout))
    sock.settimeout(None)
    return sock


class Relay:
    """Accepts on ``listener`` (already bound and listening) and joins each client to
    ``target`` inside the namespace open as ``ns_fd``."""

    def __init__(self, name: str, listener: socket.socket, ns_fd: int,
                 target: tuple[str, int]) -> None:
        self.name = name
        self.listener = listener
        self.ns_fd = ns_fd
        self.target = target
        self._thread = threading.Thread(target=self._accept, name=f"relay-{name}", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._thread.join(timeout=2)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name=f"relay-{self.name}-conn",
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            try:
                netns.enter(self.ns_fd)
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError:
                return
            with upstream:
                upstream.settimeout(None)
                back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
                back.start()
                _pump(client, upstream)
                back.join()
