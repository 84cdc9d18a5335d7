#!/usr/bin/env python3
"""Build the benchmark captures with the real kernel (root; ip, ethtool, tcpdump).

    python benchmarks/make_captures.py [--out /var/tmp/pcapflow-bench] [--force]

short.pcap  many short HTTP/1.x-like connections (handshake, request, ~10 KB response,
            server closes first), >= 2M packets, full snaplen
bulk.pcap   a few long bulk connections, >= 2M packets, snaplen 96
refused.pcap  a storm of connection attempts to a closed port (SYN, RST-ACK), >= 2M
            packets: the ephemeral ports come round again, as in a real storm
short.pcapng, short.pcap.gz  the same packets as short.pcap, for the format comparison

Two network namespaces (pfb-srv, pfb-cli) joined by a veth pair with segmentation and
receive offloads off, so segments are MTU-sized as on a wire. tcpdump captures on the
server's veth until it has carried the target number of packets; then the clients stop
and every connection closes with FIN/ACK. Namespaces are deleted afterwards, also on
error. Files already in the output directory are reused unless --force.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

NS_SRV, NS_CLI = "pfb-srv", "pfb-cli"
DEV_SRV, DEV_CLI = "pfb-s0", "pfb-c0"
SRV_IP = "10.77.0.1"
PORT = 8080
RESPONSE_BODY = 10 * 1024
DEFAULT_OUT = Path("/var/tmp/pcapflow-bench")
DEFAULT_PACKETS = 2_050_000


# --- roles: run inside a namespace as `make_captures.py _role NAME ARGS...` -------------

def _stop_on_stdin_eof() -> threading.Event:
    """An event set when the parent closes our stdin: the signal to wind down."""
    stop = threading.Event()

    def wait() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait, daemon=True).start()
    return stop


def serve_short(workers: str) -> None:
    """HTTP/1.0-style server: read the request, write ~10 KB, close (server closes first)."""
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {RESPONSE_BODY}"
            "\r\nConnection: close\r\n\r\n").encode()
    response = head + b"x" * RESPONSE_BODY
    ls = socket.socket()
    ls.bind((SRV_IP, PORT))
    ls.listen(4096)
    print("ready", flush=True)
    for _ in range(int(workers) - 1):  # pre-forked workers accepting on one socket
        if os.fork() == 0:
            break
    while True:
        conn, _ = ls.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(response)
        conn.close()


def client_short(src_ip: str) -> None:
    """One request per connection, each from the next source port, until told to stop."""
    stop = _stop_on_stdin_eof()
    request = f"GET /item HTTP/1.1\r\nHost: {SRV_IP}:{PORT}\r\nConnection: close\r\n\r\n"
    n = 0
    for port in range(32768, 61000):  # the default ephemeral range, each port once
        if stop.is_set():
            break
        s = socket.socket()
        s.bind((src_ip, port))
        s.connect((SRV_IP, PORT))
        s.sendall(request.encode())
        while s.recv(65536):
            pass
        s.close()
        n += 1
    print(n, flush=True)


def serve_bulk(conns: str) -> None:
    """Accept the bulk connections; read each to EOF, then close."""
    ls = socket.socket()
    ls.bind((SRV_IP, PORT))
    ls.listen(64)
    print("ready", flush=True)

    def sink(conn: socket.socket) -> None:
        while conn.recv(1 << 20):
            pass
        conn.close()

    threads = [threading.Thread(target=sink, args=(ls.accept()[0],)) for _ in range(int(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def client_bulk(src_ip: str, conns: str, rate: str) -> None:
    """`conns` connections sending as fast as pacing allows until told to stop, then FIN."""
    stop = _stop_on_stdin_eof()
    chunk = b"\0" * (256 * 1024)

    def push(port: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, 47, int(float(rate) * 1e6))  # SO_MAX_PACING_RATE, B/s
        s.bind((src_ip, port))
        s.connect((SRV_IP, PORT))
        while not stop.is_set():
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()

    threads = [threading.Thread(target=push, args=(40000 + i,)) for i in range(int(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(conns, flush=True)


def serve_refused() -> None:
    """Nothing listens on PORT: the kernel answers every SYN with an RST."""
    stop = _stop_on_stdin_eof()
    print("ready", flush=True)
    stop.wait()


def client_refused(src_ip: str) -> None:
    """connect() to the closed port again and again, the kernel choosing each source port."""
    stop = _stop_on_stdin_eof()
    n = 0
    while not stop.is_set():
        s = socket.socket()
        s.bind((src_ip, 0))
        with contextlib.suppress(ConnectionRefusedError):
            s.connect((SRV_IP, PORT))
        s.close()
        n += 1
    print(n, flush=True)


ROLES = {"serve-short": serve_short, "client-short": client_short,
         "serve-bulk": serve_bulk, "client-bulk": client_bulk,
         "serve-refused": serve_refused, "client-refused": client_refused}


# --- the lab ----------------------------------------------------------------------------

def sh(*cmd: str, ns: str | None = None, check: bool = True) -> str:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(full)}: {res.stderr.strip()}")
    return res.stdout


def teardown() -> None:
    for ns in (NS_SRV, NS_CLI):
        sh("ip", "netns", "del", ns, check=False)


def setup(clients: int) -> None:
    teardown()
    for ns in (NS_SRV, NS_CLI):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "link", "add", DEV_SRV, "netns", NS_SRV, "type", "veth",
       "peer", "name", DEV_CLI, "netns", NS_CLI)
    addrs = {DEV_SRV: [SRV_IP], DEV_CLI: [client_ip(i) for i in range(clients)]}
    for ns, dev in ((NS_SRV, DEV_SRV), (NS_CLI, DEV_CLI)):
        # Real wire segments: no segmentation or receive offloads (and real checksums).
        sh("ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off", ns=ns)
        for a in addrs[dev]:
            sh("ip", "addr", "add", f"{a}/24", "dev", dev, ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)


def client_ip(i: int) -> str:
    return f"10.77.0.{10 + i}"


def role(ns: str, name: str, *args: object) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", ns, sys.executable, __file__, "_role", name, *map(str, args)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # killpg ends the server's forks too


def veth_packets() -> int:
    """Packets the server's veth has sent plus received."""
    st = json.loads(sh("ip", "-n", NS_SRV, "-j", "-s", "link", "show", DEV_SRV))[0]["stats64"]
    return st["rx"]["packets"] + st["tx"]["packets"]


def capture(path: Path, snaplen: int, target: int, kind: str, args: argparse.Namespace) -> dict:
    """Run the lab traffic of `kind` until the veth carried `target` packets; tcpdump it."""
    nclients = 1 if kind == "bulk" else args.clients
    procs: list[subprocess.Popen] = []
    tcpdump = None
    t0 = time.perf_counter()
    try:
        setup(nclients)
        tmp = path.with_suffix(".part")
        tcpdump = subprocess.Popen(
            ["ip", "netns", "exec", NS_SRV, "tcpdump", "-i", DEV_SRV, "-n", "-Z", "root",
             "-s", str(snaplen), "-B", str(args.buffer_mib * 1024), "-w", str(tmp), "tcp"],
            stderr=subprocess.PIPE, text=True)
        line = tcpdump.stderr.readline()
        if "listening on" not in line:
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")
        if kind == "short":
            server = role(NS_SRV, "serve-short", args.server_workers)
        elif kind == "bulk":
            server = role(NS_SRV, "serve-bulk", args.bulk_conns)
        else:
            server = role(NS_SRV, "serve-refused")
        procs.append(server)
        if (line := server.stdout.readline().strip()) != "ready":
            raise RuntimeError(f"the server did not start: {line!r}, exit {server.poll()}")
        start = veth_packets()
        if kind in ("short", "refused"):
            procs += [role(NS_CLI, f"client-{kind}", client_ip(i)) for i in range(nclients)]
        else:
            procs.append(role(NS_CLI, "client-bulk", client_ip(0), args.bulk_conns,
                              args.bulk_rate))
        clients = procs[1:]
        last = 0.0
        while (n := veth_packets() - start) < target:
            if any(p.poll() is not None for p in clients):
                raise RuntimeError("a client ended early")
            if time.perf_counter() - last > 10:
                print(f"  {kind}: {n:,} packets, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)
                last = time.perf_counter()
            time.sleep(0.2)
        for p in clients:
            p.stdin.close()
        conns = sum(int(p.stdout.read() or 0) for p in clients)
        for p in clients:
            p.wait()
        time.sleep(1.0)  # the last ACKs, and tcpdump's ring drained
        tcpdump.send_signal(signal.SIGINT)
        err = tcpdump.stderr.read()
        tcpdump.wait()
        tcpdump = None
        stats = {k: int(v) for v, k in re.findall(r"(\d+) packets? (captured|received by filter"
                                                   r"|dropped by kernel)", err)}
        tmp.rename(path)
    finally:
        try:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):  # ended already
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            if tcpdump:
                tcpdump.kill()
                tcpdump.wait()
        finally:
            teardown()
    packets, syns = count(path)
    if packets != stats.get("captured"):
        print(f"  warning: tcpdump said {stats.get('captured')} packets, the file has {packets}",
              file=sys.stderr)
    return {"packets": packets, "connections": syns, "clients_counted": conns,
            "dropped_by_kernel": stats.get("dropped by kernel"),
            "received_by_filter": stats.get("received by filter"),
            "seconds": round(time.perf_counter() - t0, 1)}


def count(path: Path) -> tuple[int, int]:
    """(packets, SYNs without ACK) of an Ethernet/IPv4 pcap, by walking its records."""
    packets = syns = 0
    with open(path, "rb") as f:
        endian = "<" if f.read(24)[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        rec = struct.Struct(endian + "IIII")
        while len(head := f.read(16)) == 16:
            caplen = rec.unpack(head)[2]
            buf = f.read(caplen)
            packets += 1
            if len(buf) > 47 and buf[12:14] == b"\x08\x00":
                off = 14 + (buf[14] & 15) * 4 + 13
                if off < len(buf) and buf[off] & 0x12 == 0x02:
                    syns += 1
    return packets, syns


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_role":
        ROLES[sys.argv[2]](*sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="rebuild files already there")
    ap.add_argument("--packets", type=int, default=DEFAULT_PACKETS,
                    help="packets per capture (default %(default)s)")
    ap.add_argument("--clients", type=int, default=6, help="client processes (one IP each)")
    ap.add_argument("--server-workers", type=int, default=2)
    ap.add_argument("--bulk-conns", type=int, default=4)
    ap.add_argument("--bulk-rate", type=float, default=40.0,
                    help="pacing rate of each bulk connection, MB/s (default %(default)s)")
    ap.add_argument("--buffer-mib", type=int, default=256, help="tcpdump -B, MiB")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("make_captures.py: needs root (network namespaces, tcpdump)")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "captures.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    t_all = time.perf_counter()
    for kind, snaplen in (("short", 0), ("bulk", 96), ("refused", 0)):
        path = args.out / f"{kind}.pcap"
        if path.exists() and not args.force and path.name in manifest:
            continue
        print(f"capturing {path} ...", file=sys.stderr)
        manifest[path.name] = capture(path, snaplen, args.packets, kind, args)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    short = args.out / "short.pcap"
    for name, convert in (("short.pcapng", to_pcapng), ("short.pcap.gz", to_gzip)):
        path = args.out / name
        if args.force or not path.exists() or path.stat().st_mtime < short.stat().st_mtime:
            t = time.perf_counter()
            convert(short, path)
            manifest[name] = {"seconds": round(time.perf_counter() - t, 1)}
            manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{'file':<15} {'packets':>10} {'conns':>8} {'MiB':>8} {'dropped':>8} {'made in':>8}")
    for name in ("short.pcap", "bulk.pcap", "refused.pcap", "short.pcapng", "short.pcap.gz"):
        m, of = manifest[name], manifest[name.split(".")[0] + ".pcap"]
        print(f"{name:<15} {of['packets']:>10} {of['connections']:>8} "
              f"{(args.out / name).stat().st_size / 2**20:>8.1f} "
              f"{m.get('dropped_by_kernel', ''):>8} {m['seconds']:>7.1f}s")
    print(f"total {time.perf_counter() - t_all:.1f} s; facts in {manifest_path}")
    return 0


def to_pcapng(src: Path, dst: Path) -> None:
    if shutil.which("editcap"):
        subprocess.run(["editcap", "-F", "pcapng", str(src), str(dst)], check=True)
    else:
        import dpkt
        with open(src, "rb") as f, open(dst, "wb") as out:
            reader = dpkt.pcap.Reader(f)
            writer = dpkt.pcapng.Writer(out, linktype=reader.datalink())
            for ts, buf in reader:
                writer.writepkt(buf, ts)


def to_gzip(src: Path, dst: Path) -> None:
    with open(src, "rb") as f, gzip.open(dst, "wb", compresslevel=6) as out:
        shutil.copyfileobj(f, out, 1 << 20)


if __name__ == "__main__":
    sys.exit(main())
