#!/usr/bin/env python3
"""Benchmark: pcapflow against a bare dpkt loop, tshark and tcptrace on one big capture.

    python tools/bench.py [--copies 50] [--runs 3] [--keep /tmp/bench.pcap]

Builds a capture of many short real connections by replaying a lab capture
(sample_pcaps/http_pileup/server.pcap, 200 HTTP connections) `copies` times, each copy
with its client ports shifted and its times moved on, then times each tool on it in the
same invocation and prints medians, packets per second and ratios to pcapflow.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dpkt

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "sample_pcaps" / "http_pileup" / "server.pcap"
BARE_LOOP = "import dpkt, sys\nfor _ in dpkt.pcap.Reader(open(sys.argv[1], 'rb')): pass"


def build(path: Path, copies: int) -> int:
    """Write `copies` replays of SEED, ports and times shifted; return the packet count."""
    with open(SEED, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        linktype = reader.datalink()
        packets = [(ts, buf) for ts, buf in reader]
    span = packets[-1][0] - packets[0][0] + 1.0
    n = 0
    with open(path, "wb") as out:
        writer = dpkt.pcap.Writer(out, linktype=linktype)
        for k in range(copies):
            for ts, buf in packets:
                eth = dpkt.ethernet.Ethernet(buf)
                tcp = eth.data.data
                if tcp.sport != 8080:
                    tcp.sport = 1024 + (tcp.sport + 7 * k) % 64000
                else:
                    tcp.dport = 1024 + (tcp.dport + 7 * k) % 64000
                writer.writepkt(bytes(eth), ts + k * span)
                n += 1
    return n


def timed(cmd: list[str], runs: int) -> float | None:
    """Median wall time of a command, None when it is not installed."""
    if shutil.which(cmd[0]) is None:
        return None
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write the capture here and keep it")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    path = args.keep or tmp / "bench.pcap"
    n = build(path, args.copies)
    print(f"capture: {path} ({n:,} packets, {args.copies * 200:,} connections, "
          f"{path.stat().st_size / 2**20:.1f} MiB)")
    py = sys.executable
    tools = {
        "pcapflow analyze (json)": [py, "-m", "pcapflow", "analyze", str(path), "--format", "json",
                                    "-o", str(tmp / "out.json"), "--no-progress"],
        "dpkt bare loop": [py, "-c", BARE_LOOP, str(path)],
        "tshark -q -z conv,tcp": ["tshark", "-q", "-n", "-r", str(path), "-z", "conv,tcp"],
        "tcptrace -n -l": ["tcptrace", "-n", "-l", str(path)],
    }
    results = {name: timed(cmd, args.runs) for name, cmd in tools.items()}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    base = results["pcapflow analyze (json)"]
    print(f"{'tool':<26} {'median s':>9} {'packets/s':>11} {'vs pcapflow':>12}")
    for name, t in results.items():
        if t is None:
            print(f"{name:<26} {'not installed':>9}")
            continue
        print(f"{name:<26} {t:>9.2f} {n / t:>11,.0f} {t / base:>11.2f}x")
    print(f"peak RSS of the largest child: {peak:.0f} MiB")
    if not args.keep:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
