"""Socket programs the teardown lab runs inside its namespaces (``ip netns exec``).

Two modes, both driven by command-line arguments and printing one JSON line per event:

``steps STEP...``
    A tiny script interpreter shared by clients and servers. Each STEP is one string,
    e.g. ``"listen 10.0.2.2 8080"``, ``"accept"``, ``"send 100"``, ``"close"``. The
    "current" socket is the last one connected or accepted (``use I`` switches); sockets
    that are never closed stay open until the process exits or is killed.
``http_server`` / ``http_client``
    A small HTTP/1.1-like exchange for the many-connection scenarios: the server closes
    after a ``Connection: close`` request, after N requests, after an idle timeout, or as
    soon as it reads the client's EOF; a request carrying ``X-Lab-Leak`` makes it "forget"
    the connection at EOF (a CLOSE_WAIT leak).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

LOG_LOCK = threading.Lock()
LEAKED: list[socket.socket] = []  # sockets the HTTP server "forgets": kept open, never closed


def log(**event: object) -> None:
    """Print one JSON event line (read back by tools/lab.py); whole lines, also from threads."""
    line = json.dumps({"t": round(time.time(), 6), **event}) + "\n"
    with LOG_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def recv_exactly(sock: socket.socket, n: int) -> int:
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            break
        got += len(chunk)
    return got


def recv_until_eof(sock: socket.socket) -> int:
    got = 0
    while chunk := sock.recv(65536):
        got += len(chunk)
    return got


class StepRunner:
    """Runs the ``steps`` script; see the module docstring for the verbs."""

    def __init__(self) -> None:
        self.listener: socket.socket | None = None
        self.socks: list[socket.socket] = []
        self.cur: socket.socket | None = None

    def run(self, steps: list[str]) -> None:
        for step in steps:
            verb, *args = step.split()
            try:
                result = getattr(self, "do_" + verb)(*args)
                log(step=step, ok=True, **(result or {}))
            except OSError as exc:
                # Expected in several scenarios (RST received, connection refused).
                log(step=step, ok=False, error=type(exc).__name__, errno=exc.errno)

    def _keep(self, sock: socket.socket) -> dict:
        self.socks.append(sock)
        self.cur = sock
        local, peer = sock.getsockname(), sock.getpeername()
        return {"local": list(local[:2]), "peer": list(peer[:2])}

    def do_listen(self, host: str, port: str) -> None:
        self.listener = socket.socket(family(host), socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, int(port)))
        self.listener.listen(512)

    def do_accept(self) -> dict:
        sock, _ = self.listener.accept()
        return self._keep(sock)

    def do_connect(self, host: str, port: str, src_port: str = "0") -> dict:
        """Connect; a nonzero src_port is bound first (SO_REUSEADDR) to pin the 4-tuple."""
        sock = socket.socket(family(host), socket.SOCK_STREAM)
        if int(src_port):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if ":" in host else "0.0.0.0", int(src_port)))
        try:
            sock.connect((host, int(port)))
        except OSError:
            sock.close()
            raise
        return self._keep(sock)

    def do_use(self, index: str) -> None:
        self.cur = self.socks[int(index)]

    def do_send(self, nbytes: str) -> None:
        self.cur.sendall(b"x" * int(nbytes))

    def do_recv(self, nbytes: str) -> dict:
        return {"bytes": recv_exactly(self.cur, int(nbytes))}

    def do_recv_eof(self) -> dict:
        return {"bytes": recv_until_eof(self.cur)}

    def do_sleep(self, seconds: str) -> None:
        time.sleep(float(seconds))

    def do_at(self, epoch: str) -> None:
        """Sleep until an absolute time, so two processes can act at the same instant."""
        time.sleep(max(0.0, float(epoch) - time.time()))

    def do_wait(self, path: str) -> None:
        while not os.path.exists(path):
            time.sleep(0.005)

    def do_touch(self, path: str) -> None:
        with open(path, "w"):
            pass

    def do_linger0(self) -> None:
        """SO_LINGER on with timeout 0: close() sends RST and discards unsent data."""
        self.cur.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def do_keepalive(self, idle: str, intvl: str, cnt: str) -> None:
        self.cur.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.cur.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(idle))
        self.cur.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, int(intvl))
        self.cur.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(cnt))

    def do_shutdown_wr(self) -> None:
        self.cur.shutdown(socket.SHUT_WR)

    def do_close(self) -> None:
        self.cur.close()

    def do_hang(self) -> None:
        """Keep every socket open until the lab kills the process."""
        while True:
            time.sleep(3600)


HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n%s\r\n" + b"y" * 64


def read_request(sock: socket.socket) -> bytes | None:
    """Read one request head (tiny requests: a few recv calls at most); None on EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
    return buf


def http_server(host: str, port: int, max_requests: int, idle_timeout: float) -> None:
    """Serve until killed; close after `Connection: close`, max_requests, or idle_timeout."""
    listener = socket.socket(family(host), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    log(event="listening")

    def handle(sock: socket.socket, peer: tuple) -> None:
        served, reason, leak = 0, "client_eof", False
        sock.settimeout(idle_timeout)
        try:
            while True:
                try:
                    req = read_request(sock)
                except TimeoutError:
                    reason = "idle_timeout"
                    break
                if req is None:
                    break
                served += 1
                leak = b"x-lab-leak:" in req.lower()
                last = served >= max_requests or b"connection: close" in req.lower()
                sock.sendall(HTTP_RESPONSE % (b"Connection: close\r\n" if last else b""))
                if last:
                    reason = "request_limit" if served >= max_requests else "connection_close"
                    break
        finally:
            if leak and reason == "client_eof":
                # The "bug": EOF read, close() never called. Kept referenced (no GC close).
                LEAKED.append(sock)
                log(event="server_leak", peer_port=peer[1], requests=served)
            else:
                sock.close()
                log(event="server_close", peer_port=peer[1], requests=served, reason=reason)

    while True:
        sock, peer = listener.accept()
        threading.Thread(target=handle, args=(sock, peer), daemon=True).start()


def http_client(host: str, port: int, plan: list[str], workers: int) -> None:
    """Run one connection per plan entry.

    ``close`` (one request with ``Connection: close``), ``idle`` (one keep-alive request,
    then silence until the server's idle timeout closes), ``limit:N`` (N keep-alive
    requests; the server closes after the N-th): the server closes first and the client
    closes when it reads EOF. ``client_close`` (one keep-alive request, then the client
    closes first) and ``leak`` (the same with an ``X-Lab-Leak`` header: the server never
    closes). A ``@PORT`` suffix binds that source port first (e.g. ``client_close@41001``).
    """

    def one(entry: str) -> None:
        kind, _, src = entry.partition("@")
        sock = socket.socket(family(host), socket.SOCK_STREAM)
        if src:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if ":" in host else "0.0.0.0", int(src)))
        sock.connect((host, port))
        my_port = sock.getsockname()[1]
        nreq = int(kind.split(":")[1]) if kind.startswith("limit") else 1
        for _ in range(nreq):
            hdr = {"close": b"Connection: close\r\n", "leak": b"X-Lab-Leak: 1\r\n"}
            sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n" + hdr.get(kind, b"") + b"\r\n")
            recv_response(sock)
        if kind not in ("client_close", "leak"):
            recv_until_eof(sock)  # "idle": silent until the server's idle timeout closes
        sock.close()
        log(event="client_done", port=my_port, kind=kind)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, plan))


def recv_response(sock: socket.socket) -> None:
    """Read one response of the fixed size HTTP_RESPONSE produces."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    recv_exactly(sock, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    sub.add_parser("steps").add_argument("step", nargs="+")
    srv = sub.add_parser("http_server")
    srv.add_argument("host")
    srv.add_argument("port", type=int)
    srv.add_argument("--max-requests", type=int, default=5)
    srv.add_argument("--idle-timeout", type=float, default=1.0)
    cli = sub.add_parser("http_client")
    cli.add_argument("host")
    cli.add_argument("port", type=int)
    cli.add_argument("--workers", type=int, default=8)
    cli.add_argument("plan", nargs="+")
    args = ap.parse_args()
    if args.mode == "steps":
        StepRunner().run(args.step)
    elif args.mode == "http_server":
        http_server(args.host, args.port, args.max_requests, args.idle_timeout)
    else:
        http_client(args.host, args.port, args.plan, args.workers)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
