#!/usr/bin/env python3
"""Benchmark pcapflow against tshark, tcptrace, NFStream and a bare dpkt loop.

    python benchmarks/run.py [--capture short|bulk|refused|all] [--runs 3] [--quick] [--scale K]
                             [--json PATH] [--dir /var/tmp/pcapflow-bench]

Runs every tool `--runs` times on the same file(s) made by make_captures.py, in this one
invocation, and prints per tool the median wall time, packets/s, the ratio to pcapflow's
time, the CPU time and the tool's own peak RSS (from os.wait4 on that child). Also
pcapflow on short.pcapng and short.pcap.gz against short.pcap, and with --scale K
pcapflow's peak RSS on short.pcap against a K-times longer replay of it, as `analyze` and
as `analyze --low-memory`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from make_captures import DEFAULT_OUT, SRV_IP, count, to_gzip, to_pcapng

ROOT = Path(__file__).resolve().parent.parent
QUICK_PACKETS = 200_000
DPKT_LOOP = "import dpkt, sys\nfor ts, buf in dpkt.pcap.Reader(open(sys.argv[1], 'rb')): pass"
NFSTREAM = ("import sys\nfrom nfstream import NFStreamer\n"
            "n = sum(1 for _ in NFStreamer(source=sys.argv[1], statistical_analysis=False,"
            " n_dissections=0))\nprint(n, 'flows')")


def run_once(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one run of cmd, from wait4 on that very child."""
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {' | '.join(tail)}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def measure(cmd: list[str], runs: int, label: str) -> dict:
    results = []
    for i in range(runs):
        results.append(run_once(cmd))
        print(f"  {label}: run {i + 1}/{runs} {results[-1][0]:.2f} s", file=sys.stderr)
    wall, cpu, rss = zip(*results)
    return {"median_s": statistics.median(wall), "times_s": [round(t, 3) for t in wall],
            "cpu_s": statistics.median(cpu), "peak_rss_mib": max(rss)}


def pcapflow_cmd(path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pcapflow", "analyze", str(path), "--format", "json",
            "-o", str(out), "--no-progress", *extra]


def tools(path: Path, out: Path, nfstream_py: str | None) -> dict[str, list[str] | None]:
    """Label -> command; None when the tool is not installed."""
    have = shutil.which
    return {
        "pcapflow analyze (json)": pcapflow_cmd(path, out),
        "tshark -q -z conv,tcp": ["tshark", "-q", "-n", "-r", str(path), "-z", "conv,tcp"]
        if have("tshark") else None,
        "tcptrace -n -l": ["tcptrace", "-n", "-l", str(path)] if have("tcptrace") else None,
        "NFStream (no stats, no DPI)": [nfstream_py, "-c", NFSTREAM, str(path)]
        if nfstream_py else None,
        "dpkt bare loop": [sys.executable, "-c", DPKT_LOOP, str(path)],
    }


def records(path: Path):
    """The 24-byte global header of a pcap file, then each record, header and data."""
    with open(path, "rb") as f:
        head = f.read(24)
        yield head
        rec = struct.Struct(endian_of(head) + "IIII")
        while len(h := f.read(16)) == 16:
            yield h + f.read(rec.unpack(h)[2])


def endian_of(head: bytes) -> str:
    return "<" if head[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"


def head_of(src: Path, dst: Path, n: int) -> None:
    """The first n packets of src, byte for byte."""
    with open(dst, "wb") as out:
        for i, r in enumerate(records(src)):
            out.write(r)
            if i == n:
                break


def replay(src: Path, dst: Path, k: int) -> None:
    """Write src k times: copy i with its clients moved from 10.77.0.x to 10.77.i.x
    (checksums updated incrementally, RFC 1624) and its times moved on past copy i-1."""
    srv = bytes(map(int, SRV_IP.split(".")))
    it = records(src)
    head = next(it)
    sec = struct.Struct(endian_of(head) + "I")
    first = sec.unpack_from(next(it))[0]
    last = first
    for r in it:
        last = sec.unpack_from(r)[0]
    span = last - first + 2
    with open(dst, "wb") as out:
        out.write(head)
        for copy in range(k):
            it = records(src)
            next(it)
            for r in it:
                if copy == 0:
                    out.write(r)
                    continue
                b = bytearray(r)
                sec.pack_into(b, 0, sec.unpack_from(b)[0] + copy * span)
                if len(b) >= 16 + 54 and b[28:30] == b"\x08\x00" and b[30] == 0x45:
                    at = 16 + (28 if b[42:46] != srv else 32)  # client address, third byte
                    b[at] = copy
                    for c in (16 + 24, 16 + 50):  # IP header and TCP checksums
                        s = (~int.from_bytes(b[c:c + 2], "big") & 0xFFFF) + (copy << 8)
                        s = (s & 0xFFFF) + (s >> 16)
                        b[c:c + 2] = (~s & 0xFFFF).to_bytes(2, "big")
                out.write(b)


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout + out.stderr).strip().splitlines()
    return next((ln.strip() for ln in text if ln.strip() and "Running as user" not in ln), "?")


def machine(nfstream_py: str | None) -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   platform.processor())
    git = version(["git", "describe", "--always", "--dirty"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "pcapflow": version([sys.executable, "-c", ("import importlib.metadata as m; "
                             "print(m.version('pcapflow'))")]) + f" (git {git})",
        "dpkt": version([sys.executable, "-c", "import dpkt; print(dpkt.__version__)"]),
        "tshark": version(["tshark", "--version"]),
        "tcptrace": version(["tcptrace", "-v"]),
        "nfstream": version([nfstream_py, "-c", "import nfstream; print(nfstream.__version__)"])
        if nfstream_py else "not installed",
    }


def row(name: str, r: dict | None, packets: int, base: float | None, label: str) -> str:
    if r is None:
        return f"{name:<30} {'not installed':>9}"
    return (f"{name:<30} {r['median_s']:>9.2f} {packets / r['median_s']:>11,.0f} "
            f"{r['median_s'] / base if base else float('nan'):>8.2f}x {r['cpu_s']:>8.2f} "
            f"{r['peak_rss_mib']:>9.0f}  {label}")


HEADER = (f"{'tool':<30} {'median s':>9} {'packets/s':>11} {'ratio':>9} {'cpu s':>8} "
          f"{'peak MiB':>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_OUT, help="where the captures are")
    ap.add_argument("--capture", choices=("short", "bulk", "refused", "all"), default="all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help=f"the first {QUICK_PACKETS:,} packets of each capture only")
    ap.add_argument("--scale", type=int, metavar="K",
                    help="also pcapflow's peak RSS on short.pcap replayed K times (K <= 255)")
    ap.add_argument("--nfstream-python", help="a Python with nfstream installed "
                    "(default: DIR/nfstream-venv/bin/python when present)")
    ap.add_argument("--json", type=Path, help="also save the figures here")
    args = ap.parse_args()
    nf = args.nfstream_python
    if nf is None and (args.dir / "nfstream-venv/bin/python").exists():
        nf = str(args.dir / "nfstream-venv/bin/python")
    kinds = ["short", "bulk", "refused"] if args.capture == "all" else [args.capture]
    files = {k: args.dir / f"{k}.pcap" for k in kinds}
    if args.scale:
        files.setdefault("short", args.dir / "short.pcap")
    for path in files.values():
        if not path.exists():
            sys.exit(f"{path} missing: run `sudo python benchmarks/make_captures.py` first")
    if args.quick:
        for kind, path in files.items():
            small = args.dir / f"{kind}-quick.pcap"
            if not small.exists() or small.stat().st_mtime < path.stat().st_mtime:
                head_of(path, small, QUICK_PACKETS)
            files[kind] = small

    info = machine(nf)
    report: dict = {"machine": info, "runs": args.runs, "captures": {}}
    lines = [f"pcapflow benchmark, {info['date']}",
             *(f"  {k}: {v}" for k, v in info.items() if k != "date"),
             f"  medians of {args.runs} runs; ratio = tool time / pcapflow time on the same file;",
             "  cpu s = user+sys of the tool's process and its children;",
             "  peak MiB = largest RSS in the tool's process tree (from wait4 on it)"]
    out = Path(tempfile.mkdtemp(prefix="pcapflow-bench-")) / "out.json"
    try:
        for kind in kinds:
            path = files[kind]
            packets, conns = count(path)
            mib = path.stat().st_size / 2**20
            print(f"{path.name}: {packets:,} packets, {conns:,} connections", file=sys.stderr)
            res = {name: measure(cmd, args.runs, name) if cmd else None
                   for name, cmd in tools(path, out, nf).items()}
            base = res["pcapflow analyze (json)"]["median_s"]
            entry = {"file": str(path), "packets": packets, "connections": conns,
                     "mib": round(mib, 1), "tools": res}
            lines += ["", (f"{path.name}: {packets:,} packets, {conns:,} connections, "
                          f"{mib:,.1f} MiB"), HEADER]
            lines += [row(name, r, packets, base, "") for name, r in res.items()]
            if kind == "short":
                lines += ["", ("formats (pcapflow analyze; ratio = time / time on "
                          f"{path.name})"), HEADER]
                entry["formats"] = {}
                for suffix, convert in ((".pcapng", to_pcapng), (".pcap.gz", to_gzip)):
                    other = path.with_name(path.stem + suffix)
                    if not other.exists() or other.stat().st_mtime < path.stat().st_mtime:
                        convert(path, other)
                    r = measure(pcapflow_cmd(other, out), args.runs, f"pcapflow {other.name}")
                    entry["formats"][other.name] = r
                    lines.append(row(f"pcapflow {other.name}", r, packets, base,
                                     f"{other.stat().st_size / 2**20:,.1f} MiB"))
            report["captures"][kind] = entry
        if args.scale:
            lines += scale(files["short"], args.scale, out, report)
    finally:
        shutil.rmtree(out.parent)
    text = "\n".join(lines)
    print(text)
    if args.json:
        report["text"] = text
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def scale(path: Path, k: int, out: Path, report: dict) -> list[str]:
    """pcapflow's peak RSS on path and on path replayed k times (one run each), without and
    with --low-memory."""
    big = path.with_name(f"{path.stem}-x{k}.pcap")
    if not big.exists() or big.stat().st_mtime < path.stat().st_mtime:
        print(f"writing {big.name} ...", file=sys.stderr)
        replay(path, big, k)
    one = report["captures"].get("short", {}).get("tools", {}).get("pcapflow analyze (json)")
    if one is None:
        one = measure(pcapflow_cmd(path, out), 1, f"pcapflow {path.name}")
    many = measure(pcapflow_cmd(big, out), 1, f"pcapflow {big.name}")
    low = {f.name: measure(pcapflow_cmd(f, out, "--low-memory"), 1, f"pcapflow --low-memory {f.name}")
           for f in (path, big)}
    packets = count(path)[0]
    report["scale"] = {"k": k, "file": str(big), "packets_1x": packets,
                       "packets_kx": packets * k, "one": one, "many": many, "low_memory": low}
    return ["", (f"memory scaling: pcapflow analyze on {path.name} and on it replayed "
                f"{k} times ({big.name}, {packets * k:,} packets, one run)"), HEADER,
            row(f"pcapflow {path.name}", one, packets, one["median_s"], ""),
            row(f"pcapflow {big.name}", many, packets * k, one["median_s"],
                f"RSS {many['peak_rss_mib'] / one['peak_rss_mib']:.2f}x of 1x"),
            row(f"--low-memory {path.name}", low[path.name], packets, one["median_s"], ""),
            row(f"--low-memory {big.name}", low[big.name], packets * k, one["median_s"],
                f"RSS {low[big.name]['peak_rss_mib'] / low[path.name]['peak_rss_mib']:.2f}x of 1x")]


if __name__ == "__main__":
    sys.exit(main())
