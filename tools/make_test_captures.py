#!/usr/bin/env python3
"""Regenerate tests/data/: tiny real captures of short TCP connections, one per format/link type.

Run as root: `python3 tools/make_test_captures.py` (needs iproute2, tcpdump, dumpcap, nft).
Traffic is made only inside network namespaces named pfr-*, deleted afterwards.

Topology (addresses are what tests/test_capture.py asserts):
  pfr-a (client) pa 10.0.0.1 fd00::1 ==veth== pb 10.0.0.2 fd00::2 pfr-b (server, port 8080)
  pfr-a tuna 10.6.0.1 fd06::1 ==tun, relayed by this script== tunb 10.6.0.2 fd06::2 pfr-b
  pfr-a fa 10.30.1.1 -- pfr-r (router) -- MTU 576 -- fb 10.30.2.1 pfr-b: IPv4 fragments
Each client binds a fixed source port, so every 4-tuple is known in advance.

Files Linux cannot capture (or this kernel, without 8021q/act_vlan modules, cannot make)
are derived from real ones, by this script:
  vlan.pcap            eth_us.pcap with an 802.1Q tag (VLAN 10) inserted in the frames of
                       port 40001 and a QinQ pair (802.1ad 100, 802.1Q 20) in those of 40002
  eth_be.pcap          eth_us.pcap with every header byte-swapped (a big-endian writer)
  null.pcap, loop.pcap raw.pcap with the 4-byte BSD loopback family prepended
                       (LINKTYPE_NULL: host order, AF_INET 2 / AF_INET6 30 as macOS;
                       LINKTYPE_LOOP: network order, AF_INET6 24 as OpenBSD)
  *.gz .bz2 .xz .zst   compressed copies of eth_us.pcap
  truncated.pcap(ng)   eth_us.pcap / two_links.pcapng cut inside a record (tcpdump killed)
"""
from __future__ import annotations

import bz2
import fcntl
import gzip
import lzma
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import zstandard

OUT = Path(__file__).resolve().parent.parent / "tests" / "data"
ME = str(Path(__file__).resolve())
NS = ("pfr-a", "pfr-b", "pfr-r")
REQUEST = b"GET / HTTP/1.1\r\nHost: pfr\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def sh(*cmds: str) -> None:
    for cmd in cmds:
        subprocess.run(cmd, shell=True, check=True)


def ns(name: str, *cmds: str) -> None:
    sh(*(f"ip netns exec {name} {c}" for c in cmds))


# --- the two ends, run inside the namespaces by the commands below -------------------------

def serve() -> None:
    """Answer each connection on port 8080 with one HTTP response, then close first."""
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 8080))
    s.listen()
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        data = b""
        while not data.endswith(b"\r\n\r\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        c.sendall(RESPONSE)
        c.close()


def client(src: str, sport: str, dst: str, opt: str = "") -> None:
    """One connection from src:sport; `opt`: ipopts, hbh (IPv6 hop-by-hop), big (DF off, 1400 B)."""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if opt == "ipopts":  # NOP NOP NOP EOL: a 24-byte IPv4 header (RFC 791 3.1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00")
    elif opt == "hbh":  # hop-by-hop header holding one PadN option (RFC 8200 4.2)
        s.setsockopt(socket.IPPROTO_IPV6, 54, b"\x00\x00\x01\x04\x00\x00\x00\x00")  # IPV6_HOPOPTS
    elif opt == "big":
        s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF clear
    s.bind((src, int(sport)))
    try:
        s.connect((dst, 8080 if opt != "refused" else 8081))
    except ConnectionRefusedError:
        return
    s.sendall(REQUEST if opt != "big" else REQUEST[:-2] + b"X-Pad: " + b"p" * 1400 + b"\r\n\r\n")
    while s.recv(4096):
        pass
    s.close()


def relay() -> None:
    """Create tun devices tuna and tunb and pass IP packets between them (a wire for LINKTYPE_RAW)."""
    fds = []
    for name in (b"tuna", b"tunb"):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name, 0x0001 | 0x1000))  # TUNSETIFF: TUN|NO_PI
        fds.append(fd)
    print("ready", flush=True)
    while True:
        for fd in select.select(fds, [], [])[0]:
            os.write(fds[1 - fds.index(fd)], os.read(fd, 65536))


def raw_frame(dev: str) -> None:
    """Send one non-IP Ethernet frame (ethertype 0x88b5, IEEE local experimental)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((dev, 0))
    s.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"pcapflow".ljust(46, b"\0"))


# --- namespaces ----------------------------------------------------------------------------

def cleanup() -> None:
    for n in NS:
        subprocess.run(["ip", "netns", "del", n], check=False, stderr=subprocess.DEVNULL)


def setup() -> None:
    for n in NS:
        sh(f"ip netns add {n}")
        # no router solicitations, DAD or RAs: captures hold only the traffic made below
        ns(n, "sysctl -qw net.ipv6.conf.default.router_solicitations=0",
           "sysctl -qw net.ipv6.conf.default.accept_dad=0", "sysctl -qw net.ipv6.conf.default.accept_ra=0",
           "ip link set lo up")
    sh("ip link add pa netns pfr-a address 02:00:00:00:00:0a type veth peer pb netns pfr-b address 02:00:00:00:00:0b",
       "ip link add fa netns pfr-a type veth peer fr1 netns pfr-r",
       "ip link add fr2 netns pfr-r mtu 576 type veth peer fb netns pfr-b mtu 576")
    for side, me, peer, mac in (("a", 1, 2, "0b"), ("b", 2, 1, "0a")):
        n, d, t = f"pfr-{side}", f"p{side}", f"tun{side}"
        sh(f"ip link set {t} netns {n}")
        ns(n, f"ip link set {d} up", f"ip addr add 10.0.0.{me}/24 dev {d}",
           f"ip addr add fd00::{me}/64 dev {d} nodad",
           f"ip neigh add 10.0.0.{peer} lladdr 02:00:00:00:00:{mac} dev {d} nud permanent",
           f"ip neigh add fd00::{peer} lladdr 02:00:00:00:00:{mac} dev {d} nud permanent",
           f"ip link set {t} up", f"ip addr add 10.6.0.{me} peer 10.6.0.{peer} dev {t}",
           f"ip addr add fd06::{me}/64 dev {t} nodad")
    ns("pfr-r", "sysctl -qw net.ipv4.ip_forward=1", "ip link set fr1 up", "ip link set fr2 up",
       "ip addr add 10.30.1.254/24 dev fr1", "ip addr add 10.30.2.254/24 dev fr2")
    ns("pfr-a", "ip link set fa up", "ip addr add 10.30.1.1/24 dev fa",
       "ip route add 10.30.2.0/24 via 10.30.1.254")
    # the server advertises a 1460-byte MSS although its link is 576: the router must fragment
    ns("pfr-b", "ip link set fb up", "ip addr add 10.30.2.1/24 dev fb",
       "ip route add 10.30.1.0/24 via 10.30.2.254 advmss 1460")
    # NFLOG: copy the client's TCP packets to netlink groups 5 and 6 (one reader per group)
    ns("pfr-a", "nft add table ip pfr", "nft add chain ip pfr out '{ type filter hook output priority 0; }'",
       "nft add rule ip pfr out tcp dport 8080 log group 5", "nft add rule ip pfr out tcp dport 8080 log group 6")
    time.sleep(3)  # let IPv6 MLD reports of the new interfaces pass before capturing


def capture(runs: list[tuple[str, list[str]]], traffic: list[tuple[str, ...]]) -> None:
    """Start each capture command (in pfr-a unless it names another ns), make traffic, stop."""
    procs = []
    for out, cmd in runs:
        where = "pfr-b" if "-i fb" in " ".join(cmd) else "pfr-a"
        procs.append(subprocess.Popen(["ip", "netns", "exec", where, *cmd, "-w", str(OUT / out)],
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:  # tcpdump and dumpcap say so on stderr once they capture
        while "apturing on" not in (line := p.stderr.readline()) and "listening on" not in line:
            if not line:
                raise SystemExit(f"capture failed: {p.args}")
    try:
        time.sleep(0.5)
        make(traffic)
        time.sleep(0.5)
    finally:
        for p in procs:
            p.send_signal(2)
            p.wait()


def make(traffic: list[tuple[str, ...]]) -> None:
    for t in traffic:
        if t[0] == "raw":
            subprocess.run(["ip", "netns", "exec", "pfr-a", sys.executable, ME, "raw", t[1]], check=True)
        elif t[0] == "udp":  # one datagram to a closed port: UDP out, ICMP port unreachable back
            ns("pfr-a", f"{sys.executable} -c 'import socket; socket.socket(2, 2).sendto(b\"x\", (\"{t[1]}\", 9))'")
        else:
            subprocess.run(["ip", "netns", "exec", "pfr-a", sys.executable, ME, "client", *t], check=True)
        time.sleep(0.2)


def tcpdump(iface: str, *extra: str) -> list[str]:
    return ["tcpdump", "-i", iface, "-U", "-s", "262144", *extra]


# --- derived files ---------------------------------------------------------------------------

def pcap_frames(path: Path) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split a little-endian pcap into its global header and (record header, data) pairs."""
    raw = path.read_bytes()
    hdr, pos, out = raw[:24], 24, []
    while pos < len(raw):
        caplen = struct.unpack_from("<I", raw, pos + 8)[0]
        out.append((raw[pos:pos + 16], raw[pos + 16:pos + 16 + caplen]))
        pos += 16 + caplen
    return hdr, out


def write_pcap(path: Path, hdr: bytes, frames) -> None:
    path.write_bytes(hdr + b"".join(h + d for h, d in frames))


def insert(h: bytes, d: bytes, at: int, extra: bytes) -> tuple[bytes, bytes]:
    """A record with `extra` inserted at offset `at` of its data, lengths adjusted."""
    caplen, wirelen = struct.unpack_from("<II", h, 8)
    n = len(extra)
    return h[:8] + struct.pack("<II", caplen + n, wirelen + n), d[:at] + extra + d[at:]


def swap(fmt: str, b: bytes) -> bytes:
    return struct.pack(">" + fmt, *struct.unpack("<" + fmt, b))


def derive() -> None:
    hdr, frames = pcap_frames(OUT / "eth_us.pcap")
    write_pcap(OUT / "eth_be.pcap", swap("IHHiIII", hdr), [(swap("IIII", h), d) for h, d in frames])
    plain = (OUT / "eth_us.pcap").read_bytes()
    (OUT / "eth_us.pcap.gz").write_bytes(gzip.compress(plain, mtime=0))
    (OUT / "eth_us.pcap.bz2").write_bytes(bz2.compress(plain))
    (OUT / "eth_us.pcap.xz").write_bytes(lzma.compress(plain))
    (OUT / "eth_us.pcap.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    # cut inside the data of the 5th record, as a killed tcpdump leaves it
    cut = 24 + sum(16 + len(d) for _, d in frames[:4]) + 16 + 10
    (OUT / "truncated.pcap").write_bytes(plain[:cut])
    ng = (OUT / "two_links.pcapng").read_bytes()
    (OUT / "truncated.pcapng").write_bytes(ng[:len(ng) * 2 // 3 // 4 * 4 + 2])

    tags = {40001: b"\x81\x00\x00\x0a", 40002: b"\x88\xa8\x00\x64\x81\x00\x00\x14"}
    out = []
    for h, d in frames:
        ports = struct.unpack_from(">HH", d, 14 + (d[14] & 15) * 4) if d[12:14] == b"\x08\x00" else ()
        tag = next((tags[p] for p in ports if p in tags), b"")
        out.append(insert(h, d, 12, tag))
    write_pcap(OUT / "vlan.pcap", hdr, out)

    hdr, frames = pcap_frames(OUT / "raw.pcap")
    for name, linktype, fmt, fam6 in (("null.pcap", 0, "<I", 30), ("loop.pcap", 108, ">I", 24)):
        out = [insert(h, d, 0, struct.pack(fmt, 2 if d[0] >> 4 == 4 else fam6)) for h, d in frames]
        write_pcap(OUT / name, hdr[:20] + struct.pack("<I", linktype), out)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cleanup()
    wire = subprocess.Popen([sys.executable, ME, "relay"], stdout=subprocess.PIPE, text=True)
    wire.stdout.readline()
    server = None
    try:
        setup()
        server = subprocess.Popen(["ip", "netns", "exec", "pfr-b", sys.executable, ME, "serve"],
                                  stdout=subprocess.PIPE, text=True)
        server.stdout.readline()
        capture([("eth_us.pcap", tcpdump("pa")),
                 ("eth_ns.pcap", tcpdump("pa", "--time-stamp-precision", "nano")),
                 ("sll.pcap", tcpdump("any", "-y", "LINUX_SLL")),
                 ("sll2.pcap", tcpdump("any", "-y", "LINUX_SLL2")),
                 ("nflog.pcap", tcpdump("nflog:5")),
                 ("nflog_mix.pcapng", ["dumpcap", "-q", "-i", "nflog:6", "-i", "pa"])],
                [("10.0.0.1", "40001", "10.0.0.2"), ("10.0.0.1", "40002", "10.0.0.2", "refused"),
                 ("10.0.0.1", "40003", "10.0.0.2", "ipopts"), ("udp", "10.0.0.2"), ("raw", "pa")])
        capture([("ipv6.pcap", tcpdump("pa"))],
                [("fd00::1", "40061", "fd00::2"), ("fd00::1", "40062", "fd00::2", "hbh")])
        capture([("raw.pcap", tcpdump("tuna")),
                 ("two_links.pcapng", ["dumpcap", "-q", "-i", "pa", "-f", "tcp", "-i", "tuna"])],
                [("10.6.0.1", "40064", "10.6.0.2"), ("fd06::1", "40066", "fd06::2"),
                 ("10.0.0.1", "40004", "10.0.0.2")])
        capture([("frag.pcap", tcpdump("fb"))], [("10.30.1.1", "40030", "10.30.2.1", "big")])
    finally:
        for p in (server, wire):
            if p is not None:
                p.kill()
                p.wait()
        cleanup()
    derive()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve()
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        client(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "relay":
        relay()
    elif len(sys.argv) > 1 and sys.argv[1] == "raw":
        raw_frame(sys.argv[2])
    else:
        main()
