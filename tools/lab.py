"""Real-kernel TCP teardown lab: regenerate the sample_pcaps corpus (run as root).

    python3 tools/lab.py --out sample_pcaps [--scenario NAME ...] [--list]

Each scenario builds a fresh client / router / server namespace topology (netns ``pf-c``,
``pf-r``, ``pf-s``; a 10 ms delay on every forwarded packet, RTT 20 ms), starts three tcpdump
captures (client, router ingress, server), runs small socket programs
(tools/lab_peers.py), injects faults with nftables in the router's forward chain, takes an
``ss`` snapshot while TIME_WAIT is still running, stops the captures and writes
``<out>/<scenario>/{client,router,server}.pcap`` and ``truth.json``. The lab then measures
the captures (tools/lab_pcap.py) and compares them with what the scenario was designed to
produce; any mismatch is recorded in ``truth.json`` ("lab_check") and fails the run.
See sample_pcaps/README.md for the truth format.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab_pcap

LAB_VERSION = 1
PEERS = str(Path(__file__).resolve().parent / "lab_peers.py")
DELAYER = str(Path(__file__).resolve().parent / "lab_delay.py")
NS = {"client": "pf-c", "router": "pf-r", "server": "pf-s"}
IFACE = {"client": "veth-c", "server": "veth-s"}  # the router ends are veth-rc, veth-rs
ADDR = {
    4: {"client": "10.0.1.2", "server": "10.0.2.2", "rc": "10.0.1.1", "rs": "10.0.2.1", "plen": 24},
    6: {
        "client": "fd00:1::2",
        "server": "fd00:2::2",
        "rc": "fd00:1::1",
        "rs": "fd00:2::1",
        "plen": 64,
    },
}
PORT = 8080
DELAY_MS = 10
RECORDED_SYSCTLS = [
    "net.ipv4.tcp_orphan_retries",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_tw_reuse_delay",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_timestamps",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.tcp_rfc1337",
    "net.ipv4.tcp_sack",
    "net.ipv4.tcp_dsack",
    "net.ipv4.tcp_early_retrans",
    "net.ipv4.tcp_retries2",
    "net.ipv4.tcp_syn_retries",
]
SS_STATES = {
    "ESTAB": "ESTABLISHED",
    "SYN-SENT": "SYN_SENT",
    "SYN-RECV": "SYN_RECEIVED",
    "FIN-WAIT-1": "FIN_WAIT_1",
    "FIN-WAIT-2": "FIN_WAIT_2",
    "CLOSING": "CLOSING",
    "TIME-WAIT": "TIME_WAIT",
    "CLOSE-WAIT": "CLOSE_WAIT",
    "LAST-ACK": "LAST_ACK",
    "UNCONN": "CLOSED",
}


def sh(ns: str | None, *cmd: str, check: bool = True) -> str:
    """Run a command (inside namespace ns unless None) and return its stdout."""
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(full)} failed: {res.stderr.strip()}")
    return res.stdout


# ---------------------------------------------------------------- topology and captures


class Topology:
    """Three fresh namespaces; always deleted on exit, also on error."""

    def __enter__(self) -> Self:
        self.delete()
        try:
            self.build()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def delete(self) -> None:
        if getattr(self, "delayer", None):
            self.delayer.kill()
            self.delayer.wait()
        for ns in NS.values():
            sh(None, "ip", "netns", "del", ns, check=False)

    def build(self) -> None:
        for ns in NS.values():
            sh(None, "ip", "netns", "add", ns)
            sh(ns, "ip", "link", "set", "lo", "up")
            for key in ("all", "default"):
                sh(ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
        r = NS["router"]
        for end, peer in (("client", "veth-rc"), ("server", "veth-rs")):
            sh(
                None,
                *f"ip link add {IFACE[end]} netns {NS[end]} type veth "
                f"peer name {peer} netns {r}".split(),
            )
        links = [
            (NS["client"], "veth-c", "client", "rc"),
            (r, "veth-rc", "rc", None),
            (NS["server"], "veth-s", "server", "rs"),
            (r, "veth-rs", "rs", None),
        ]
        for ns, dev, me, gw in links:
            # Real wire segments in the captures: no segmentation or receive offloads.
            sh(ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off")
            for fam, a in ADDR.items():
                sh(ns, "ip", f"-{fam}", "addr", "add", f"{a[me]}/{a['plen']}", "dev", dev, "nodad")
            sh(ns, "ip", "link", "set", dev, "up")
            for fam, a in ADDR.items():
                if gw:
                    sh(ns, "ip", f"-{fam}", "route", "add", "default", "via", a[gw])
        sh(r, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # Faults first (priority -10), then the delay queue (iptables filter, priority 0).
        nft(
            [
                "table inet lab {",
                "chain faults {",
                "type filter hook forward priority -10; policy accept;",
                "}",
                "}",
            ]
        )
        for tables in ("iptables-legacy", "ip6tables-legacy"):
            sh(r, tables, "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
        self.delayer = subprocess.Popen(
            ["ip", "netns", "exec", r, sys.executable, DELAYER, "0", str(DELAY_MS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.delayer.stdout.readline().strip() != "ready":
            raise RuntimeError("the NFQUEUE delayer did not start")


def nft(lines: list[str]) -> None:
    """Load nftables statements into the router."""
    res = subprocess.run(
        ["ip", "netns", "exec", NS["router"], "nft", "-f", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode:
        raise RuntimeError(f"nft failed: {res.stderr.strip()}\n" + "\n".join(lines))


class Captures:
    """client.pcap, router.pcap (ingress of every router interface) and server.pcap."""

    def __init__(self, outdir: Path) -> None:
        self.specs = {
            "client": (NS["client"], ["-i", IFACE["client"]], outdir / "client.pcap"),
            "middle": (NS["router"], ["-i", "any", "-Q", "in"], outdir / "router.pcap"),
            "server": (NS["server"], ["-i", IFACE["server"]], outdir / "server.pcap"),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.stats: dict[str, str] = {}

    def start(self) -> None:
        for name, (ns, iface, path) in self.specs.items():
            cmd = ["tcpdump", "-U", "--immediate-mode", "-n", "-s", "512", "-Z", "root"]
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd, *iface, "-w", str(path), "tcp"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.procs[name] = proc
            line = proc.stderr.readline()
            while line and "listening on" not in line:
                line = proc.stderr.readline()
            if not line:
                raise RuntimeError(f"tcpdump for {name} did not start")
        self.start_ts = time.time()

    def stop(self) -> None:
        self.stop_ts = time.time()
        for name, proc in self.procs.items():
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            self.stats[name] = " / ".join(x.strip() for x in err.splitlines() if "packets" in x)

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- scenario description


@dataclass
class Fault:
    """nftables rules in the router forward chain; every drop rule is counted by name."""

    name: str
    rules: list[str]
    drops: int | None = None  # expected drop count (None: not checked)


def drop_first(name: str, match: str, n: int = 1, armed_by: str | None = None) -> Fault:
    """Drop exactly the first n packets of each connection matching `match`.

    Deterministic per connection via the conntrack mark: the low byte counts the drops;
    bit 0x100 is set by packets matching `armed_by` (when given), so a match can be made
    to count only after, e.g., the peer's FIN passed. One drop_first per scenario.
    """
    rules = [f"{armed_by} ct mark set ct mark | 0x100"] if armed_by else []
    arm = " ct mark & 0x100 == 0x100" if armed_by else ""
    rules += [
        f"{match}{arm} ct mark & 0xff == {k} ct mark set ct mark & 0xffffff00 | {k + 1}"
        f' counter drop comment "{name}"'
        for k in range(n)
    ]
    return Fault(name, rules, n)


def drop_all(name: str, match: str, drops: int | None = None) -> Fault:
    return Fault(name, [f'{match} counter drop comment "{name}"'], drops)


def conn(**kw: object) -> dict:
    """Designed facts of one connection; tuples mean "any of these, measured"."""
    base = {
        "close_type": "four_way",
        "active_closer": "client",
        "client_state_end": "CLOSED",
        "server_state_end": "CLOSED",
        "client_fin_retransmits": 0,
        "server_fin_retransmits": 0,
        "lost_waves": [],
        "rst_by": "none",
        "rst_kind": None,
        "time_wait_side": "client",
        "reused_4tuple": False,
    }
    return base | kw


@dataclass
class Scenario:
    name: str
    description: str
    run: Callable[[Run], list[dict]]
    family: int = 4
    sysctls: dict[str, dict[str, str]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    invisible: dict[str, list[str]] = field(default_factory=dict)  # vantage -> facts
    aggregate: bool = False
    fin_times: str | None = None  # record this side's FIN transmission times in notes
    # After the run: measure the captures beyond the per-connection facts (notes, checks);
    # gets the Run and {vantage: segments}, returns problems (lab_check mismatches).
    measure: Callable[[Run, dict[str, list]], list[str]] | None = None


SCENARIOS: dict[str, Scenario] = {}


def scenario(description: str, **kw: object) -> Callable:
    def register(fn: Callable) -> Callable:
        SCENARIOS[fn.__name__] = Scenario(fn.__name__, description, fn, **kw)
        return fn

    return register


# ---------------------------------------------------------------- running one scenario


class Run:
    """What a scenario function gets: peers, sync files, addresses, dynamic faults."""

    def __init__(self, sc: Scenario, tmp: Path) -> None:
        self.sc, self.tmp = sc, tmp
        self.client_ip, self.server_ip = ADDR[sc.family]["client"], ADDR[sc.family]["server"]
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.output: dict[int, str] = {}  # pid -> stdout of peers already waited for
        self.faults = list(sc.faults)
        self.fault_times: dict[str, float] = {}
        self.snapshots: list[dict] = []  # extra ss snapshots taken during the scenario
        self.notes: dict[str, object] = {}  # scenario facts worth keeping (e.g. aggregate knobs)
        self.problems: list[str] = []  # differences from the design found during the run

    def spawn(self, side: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", NS[side], sys.executable, PEERS, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append((side, proc))
        return proc

    def steps(self, side: str, *steps: str) -> subprocess.Popen:
        return self.spawn(side, "steps", *steps)

    def file(self, name: str) -> str:
        return str(self.tmp / name)

    def file_touch(self, name: str) -> None:
        Path(self.file(name)).touch()

    def wait_file(self, name: str, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while not os.path.exists(self.file(name)):
            if time.time() > deadline:
                raise RuntimeError(f"{self.sc.name}: timed out waiting for {name}")
            time.sleep(0.005)

    def server(self, *steps: str) -> subprocess.Popen:
        """Start a listening server running `steps` per the step language; wait until bound."""
        proc = self.steps(
            "server", f"listen {self.server_ip} {PORT}", f"touch {self.file('ready')}", *steps
        )
        self.wait_file("ready")
        return proc

    def client(self, *steps: str, wait: bool = True) -> subprocess.Popen:
        proc = self.steps("client", *steps)
        if wait:
            self.wait(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = 60) -> str:
        """Wait for a peer to exit and return its stdout (kept for the truth file)."""
        self.output[proc.pid], err = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"{self.sc.name}: peer failed: {err.strip()}")
        return self.output[proc.pid]

    def connect(self, src_port: int = 0) -> str:
        return f"connect {self.server_ip} {PORT} {src_port}"

    def add_fault(self, fault: Fault) -> None:
        nft([f"add rule inet lab faults {r}" for r in fault.rules])
        self.faults.append(fault)
        self.fault_times[fault.name] = time.time()

    def ss_gone(self, side: str, timeout: float) -> float:
        """Wait until `side` holds no connected TCP socket (e.g. an orphan gave up); return when."""
        deadline = time.time() + timeout
        while any(s["state"] != "LISTEN" for s in ss(side)):
            if time.time() > deadline:
                raise RuntimeError(f"{self.sc.name}: {side} socket still there after {timeout} s")
            time.sleep(0.05)
        return time.time()

    def snapshot(self, label: str) -> None:
        """An extra ss snapshot in the middle of the scenario (e.g. an orphan's timer)."""
        self.snapshots.append(
            {
                "label": label,
                "taken_at": time.time(),
                "client": ss("client"),
                "server": ss("server"),
            }
        )

    def logs(self) -> list[dict]:
        """Stop every peer still running (after the captures stopped) and collect its events."""
        out = []
        for side, proc in self.procs:
            if proc.pid not in self.output:
                proc.kill()
                self.output[proc.pid] = proc.communicate()[0]
            out += [
                {"peer": side, **json.loads(line)} for line in self.output[proc.pid].splitlines()
            ]
        return out


def ss(side: str) -> list[dict]:
    """The TCP sockets of one namespace as ss reports them."""
    rows = []
    for line in sh(NS[side], "ss", "-Htanoe").splitlines():
        parts = line.split()
        timer = next((p[len("timer:(") : -1] for p in parts if p.startswith("timer:(")), None)
        rows.append(
            {
                "state": SS_STATES.get(parts[0], parts[0]),
                "local": parts[3],
                "peer": parts[4],
                "timer": timer,
                "raw": line.strip(),
            }
        )
    return rows


def sysctls(side: str) -> dict[str, str]:
    out = sh(NS[side], "sysctl", *RECORDED_SYSCTLS)
    return {k.strip(): " ".join(v.split()) for k, v in (l.split("=", 1) for l in out.splitlines())}


def fault_counts(ruleset: dict) -> Counter:
    """Packets dropped per fault name, from `nft -j list ruleset`."""
    drops: Counter = Counter()
    for item in ruleset["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            for expr in rule["expr"]:
                if "counter" in expr:
                    drops[rule["comment"]] += expr["counter"]["packets"]
    return drops


def endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def run_scenario(sc: Scenario, out: Path) -> bool:
    """Run one scenario end to end; return True when the captures match the design."""
    outdir = out / sc.name
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    with Topology(), tempfile.TemporaryDirectory(prefix="pf-lab-") as tmp:
        for side in ("client", "server"):
            for key, value in sc.sysctls.get(side, {}).items():
                sh(NS[side], "sysctl", "-qw", f"{key}={value}")
        for fault in sc.faults:
            nft([f"add rule inet lab faults {r}" for r in fault.rules])
        run = Run(sc, Path(tmp))
        caps = Captures(outdir)
        try:
            caps.start()
            designed = sc.run(run)
            time.sleep(0.3)  # let the last segments cross the 10 ms links
            snap = {"taken_at": time.time(), "client": ss("client"), "server": ss("server")}
            ruleset = json.loads(sh(NS["router"], "nft", "-j", "list", "ruleset"))
            caps.stop()
        finally:
            caps.kill()
            events = run.logs()
        node_sysctls = {side: sysctls(side) for side in ("client", "server")}
    truth = build_truth(sc, run, designed, caps, snap, ruleset, node_sysctls, events)
    (outdir / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    for problem in truth["lab_check"]["mismatches"]:
        print(f"  MISMATCH {sc.name}: {problem}", file=sys.stderr)
    return truth["lab_check"]["ok"]


# ---------------------------------------------------------------- truth

VANTAGE_FACTS = [
    "close_type",
    "active_closer",
    "rst_by",
    "client_fin_retransmits",
    "server_fin_retransmits",
    "client_keepalives",
    "server_keepalives",
    "time_wait_restarts",
    "half_close_bytes",
]


def build_truth(
    sc: Scenario,
    run: Run,
    designed: list[dict],
    caps: Captures,
    snap: dict,
    ruleset: dict,
    node_sysctls: dict,
    events: list[dict],
) -> dict:
    """Merge the design with what the kernel did (ss, counters) and the captures show."""
    measured, segments = {}, {}
    for vantage, (_, _, path) in caps.specs.items():
        segments[vantage] = lab_pcap.read_segments(str(path))
        measured[vantage] = {
            (f.client_port, f.server_port, f.incarnation): lab_pcap.facts(f)
            for f in lab_pcap.flows(segments[vantage], run.client_ip)
        }
    keys = list(measured["middle"])  # every segment sent crosses the router ingress
    mismatches = list(run.problems)
    if sc.measure:
        mismatches += sc.measure(run, segments)
    if len(keys) != len(designed):
        mismatches.append(f"{len(keys)} connections captured, {len(designed)} designed")
    by_port = {d["client_port"]: d for d in designed if "client_port" in d}
    conns = []
    for i, key in enumerate(keys):
        want = by_port.get(key[0]) or (designed[i] if i < len(designed) else conn())
        latest = all(k[:2] != key[:2] or k[2] <= key[2] for k in keys)
        c = {"client_port": key[0], "server_port": key[1], "incarnation": key[2]}
        c["expect"], problems = settle_expect(want, key, latest, measured, snap, run)
        mismatches += [f"conn {key}: {p}" for p in problems]
        c["vantage"] = vantage_view(c["expect"], key, measured, sc.invisible)
        conns.append(c)

    drops = fault_counts(ruleset)
    faults = []
    for f in run.faults:
        entry = {
            "where": "router forward",
            "name": f.name,
            "rule": "\n".join(f.rules),
            "drops": drops[f.name],
        }
        if f.name in run.fault_times:
            entry["added_at"] = run.fault_times[f.name]
        if f.drops is not None and drops[f.name] != f.drops:
            mismatches.append(f"fault {f.name}: {drops[f.name]} drops, designed {f.drops}")
        faults.append(entry)

    truth = {
        "scenario": sc.name,
        "description": sc.description,
        "lab_version": LAB_VERSION,
        "kernel": os.uname().release,
        "family": sc.family,
        "hosts": {
            side: {"ns": NS[side], "ip": ADDR[sc.family][side]} for side in ("client", "server")
        },
        "sysctls": node_sysctls,
        "sysctls_set": {side: sc.sysctls.get(side, {}) for side in ("client", "server")},
        "faults": faults,
        "capture": {
            "start": caps.start_ts,
            "stop": caps.stop_ts,
            "vantages": {"client": "client.pcap", "middle": "router.pcap", "server": "server.pcap"},
            "tcpdump": caps.stats,
            "router_delay_ms": DELAY_MS,
        },
        "ss": snap,
        "ss_during": run.snapshots,
        "connections": conns,
        "nft_ruleset": ruleset,
        "peer_events": events,
        "lab_check": {"ok": not mismatches, "mismatches": mismatches},
    }
    if sc.fin_times:
        side = sc.fin_times
        own = [m[f"{side}_fin_times"] for m in measured[side].values() if m[f"{side}_fin_times"]]
        if own:  # seconds after the first transmission, in the sender's own capture
            run.notes[f"{side}_fin_transmissions"] = len(own[0])
            run.notes["fin_tx_times"] = [round(t - own[0][0], 4) for t in own[0]]
            run.notes[f"{side}_first_fin_at"] = own[0][0]
    if run.notes:
        truth["notes"] = run.notes
    if sc.aggregate:
        truth["aggregate"] = aggregate(conns, snap, events) | run.notes
    return truth


def settle_expect(
    want: dict, key: tuple, latest: bool, measured: dict, snap: dict, run: Run
) -> tuple[dict, list[str]]:
    """Replace designed values by the kernel's and the captures' truth; report differences."""
    exp = {k: v for k, v in want.items() if k not in ("client_port",)}
    problems = []

    def settle(fact: str, actual: object) -> None:
        designed = exp.get(fact)
        ok = actual in designed if isinstance(designed, tuple) else actual == designed
        if fact in exp and not ok:
            problems.append(f"{fact}: measured {actual!r}, designed {designed!r}")
        exp[fact] = actual

    cli = endpoint(run.client_ip, key[0])
    srv = endpoint(run.server_ip, key[1])
    for side, local, peer in (("client", cli, srv), ("server", srv, cli)):
        rows = [r for r in snap[side] if r["local"] == local and r["peer"] == peer]
        # Only the latest incarnation of a 4-tuple can still own a socket.
        settle(f"{side}_state_end", rows[0]["state"] if rows and latest else "CLOSED")
        if exp[f"{side}_state_end"] == "TIME_WAIT" and exp["time_wait_side"] not in (side, "both"):
            problems.append(f"ss shows {side} TIME_WAIT, designed {exp['time_wait_side']!r}")
    mid = measured["middle"][key]
    for side in ("client", "server"):
        own = measured[side].get(key, {})  # the sender's own capture: every transmission
        settle(f"{side}_fin_retransmits", own.get(f"{side}_fin_retransmits", 0))
        settle(f"{side}_keepalives", own.get(f"{side}_keepalives", 0))
    for fact in ("close_type", "active_closer", "rst_by", "time_wait_restarts"):
        settle(fact, mid.get(fact, 0))
    if mid["active_closer"] != "none":
        exp["half_close_bytes"] = mid["half_close_bytes"]
    return exp, problems


def vantage_view(exp: dict, key: tuple, measured: dict, invisible: dict) -> dict:
    """Per capture point: the facts that come out differently there, and what it cannot see."""
    view = {}
    for vantage in ("client", "middle", "server"):
        seen = measured[vantage].get(key, {})
        hidden = invisible.get(vantage, [])
        v = {
            f: seen[f]
            for f in VANTAGE_FACTS
            if f in seen and f in exp and seen[f] != exp[f] and f not in hidden
        }
        if seen.get("rst_by") == "none" and exp.get("rst_kind") and "rst_kind" not in hidden:
            v["rst_kind"] = None  # no RST reached this capture point: no kind to tell
        if hidden:
            v["invisible"] = sorted(hidden)
        view[vantage] = v
    return view


def aggregate(conns: list[dict], snap: dict, events: list[dict]) -> dict:
    """Summary for many-connection scenarios, as an operator's ss/netstat view would give it."""
    leaks = Counter(r["local"] for r in snap["server"] if r["state"] == "CLOSE_WAIT")
    reasons = Counter(e["reason"] for e in events if e.get("event") == "server_close")
    agg = {
        "connections": len(conns),
        "server_time_wait": sum(r["state"] == "TIME_WAIT" for r in snap["server"]),
        "client_time_wait": sum(r["state"] == "TIME_WAIT" for r in snap["client"]),
        "close_types": dict(Counter(c["expect"]["close_type"] for c in conns)),
        "close_wait_leaks": [
            {"host": k.rsplit(":", 1)[0].strip("[]"), "port": int(k.rsplit(":", 1)[1]), "count": n}
            for k, n in leaks.items()
        ],
        # connections with a lost FIN (wave 1 or 3), as the router's fault counters made them
        "lost_fins": sum(any(w in (1, 3) for w in c["expect"]["lost_waves"]) for c in conns),
    }
    if reasons:
        agg["server_close_reasons"] = dict(reasons)
    return agg


# ---------------------------------------------------------------- the scenarios

EXCHANGE_C = ("send 100", "recv 100")  # client request, server response: the connection is live
EXCHANGE_S = ("accept", "recv 100", "send 100")


@scenario("The client closes first; the server closes 300 ms later: FIN, ACK, FIN, ACK.")
def four_way_client_first(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 0.3", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 0.5")
    return [conn(client_state_end="TIME_WAIT")]


@scenario("The server closes first; the client closes 300 ms after reading EOF.")
def four_way_server_first(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "sleep 0.2", "close")
    run.client(run.connect(), *EXCHANGE_C, "recv_eof", "sleep 0.3", "close", "sleep 0.2")
    return [conn(active_closer="server", server_state_end="TIME_WAIT", time_wait_side="server")]


@scenario("The server closes as soon as it reads EOF, within its delayed ACK: FIN, FIN+ACK, ACK.")
def three_way(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 0.3")
    return [conn(close_type="three_way", client_state_end="TIME_WAIT")]


@scenario(
    "Both sides close at the same instant; the FINs cross in the 10 ms links; both TIME_WAIT."
)
def simultaneous(run: Run) -> list[dict]:
    at = f"at {time.time() + 1.0:.6f}"
    run.server(*EXCHANGE_S, at, "close")
    run.client(run.connect(), *EXCHANGE_C, at, "close", "sleep 0.3")
    return [
        conn(
            close_type="simultaneous",
            active_closer="both",
            client_state_end="TIME_WAIT",
            server_state_end="TIME_WAIT",
            time_wait_side="both",
        )
    ]


CLIENT_FIN = "ip saddr 10.0.1.2 tcp flags & fin == fin"
SERVER_FIN = "ip saddr 10.0.2.2 tcp flags & fin == fin"
PURE_ACK = "tcp flags & (fin|syn|rst) == 0"


@scenario(
    "The client's FIN is dropped once in the router; its retransmission gets through.",
    faults=[drop_first("wave1", CLIENT_FIN)],
    invisible={"server": ["lost_waves"]},
)
def lost_wave1(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 0.5", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 1.2")
    return [conn(client_state_end="TIME_WAIT", client_fin_retransmits=1, lost_waves=[1])]


@scenario(
    "Every client FIN is dropped; with tcp_orphan_retries=3 the orphaned client gives up "
    "silently; the server, still ESTABLISHED, writes 2.5 s later and gets a bare RST.",
    sysctls={"client": {"net.ipv4.tcp_orphan_retries": "3"}},
    faults=[drop_all("wave1_all", CLIENT_FIN)],
    invisible={"server": ["lost_waves"]},
    fin_times="client",
)
def lost_wave1_giveup(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, f"wait {run.file('write')}", "send 100", "hang")
    run.client(run.connect(), *EXCHANGE_C, "close")
    run.notes["client_closed_at"] = time.time()
    run.snapshot("orphan retransmitting its FIN")
    run.notes["client_socket_gone_at"] = run.ss_gone("client", timeout=30)
    # tcp_orphan_retries=3 is a time budget of (2**4 - 1) * 200 ms = 3 s from the first
    # transmission; with RTO ~228 ms here the FIN goes out 5 times (TLP + 4 RTOs).
    run.snapshot("client orphan gone, server still ESTABLISHED")
    time.sleep(2.5)
    run.notes["server_write_at"] = time.time()
    run.file_touch("write")
    time.sleep(0.2)
    return [
        conn(
            close_type="fin_then_reset",
            client_fin_retransmits=(3, 4, 5),
            lost_waves=[1],
            rst_by="client",
            rst_kind="reply_to_closed",
            time_wait_side="none",
        )
    ]


@scenario(
    "The server's ACK of the client's FIN is dropped once; the client re-sends its FIN, "
    "the server answers with a duplicate ACK (D-SACK).",
    faults=[drop_first("wave2", f"ip saddr 10.0.2.2 {PURE_ACK}", armed_by=CLIENT_FIN)],
)
def lost_wave2(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 0.6", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 1.0")
    return [conn(client_state_end="TIME_WAIT", client_fin_retransmits=1, lost_waves=[2])]


@scenario(
    "The server's FIN (wave 3) is dropped once; the server in LAST_ACK re-sends it.",
    faults=[drop_first("wave3", SERVER_FIN)],
    invisible={"client": ["lost_waves"]},
)
def lost_wave3(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 0.3", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 1.2")
    return [conn(client_state_end="TIME_WAIT", server_fin_retransmits=1, lost_waves=[3])]


@scenario(
    "The server's FIN is dropped three times; it goes out four times with exponential backoff "
    "(TLP, then RTO doubling) before the client sees it.",
    faults=[drop_first("wave3", SERVER_FIN, n=3)],
    invisible={"client": ["lost_waves"]},
)
def lost_wave3_backoff(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 0.3", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 2.6")
    return [conn(client_state_end="TIME_WAIT", server_fin_retransmits=3, lost_waves=[3])]


@scenario(
    "The client's final ACK (wave 4) is dropped once; the server re-sends its FIN and the "
    "client, in TIME_WAIT, ACKs it again (restarting its 60 s timer).",
    faults=[drop_first("wave4", f"ip saddr 10.0.1.2 {PURE_ACK}", armed_by=SERVER_FIN)],
    # The server sees FIN, FIN, ACK: a lost wave 3 would look the same from there.
    invisible={"server": ["lost_waves", "time_wait_restarts"]},
)
def lost_wave4(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 0.3", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 1.2")
    return [
        conn(
            client_state_end="TIME_WAIT",
            server_fin_retransmits=1,
            lost_waves=[4],
            time_wait_restarts=1,
        )
    ]


@scenario(
    "The orphaned client's FIN_WAIT_2 expires (tcp_fin_timeout=2); the server's later data "
    "is answered with a bare RST.",
    sysctls={"client": {"net.ipv4.tcp_fin_timeout": "2"}},
)
def fin_wait2_timeout(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 3.5", "send 100", "sleep 0.3", "close")
    client = run.client(run.connect(), *EXCHANGE_C, "close", "sleep 4.2", wait=False)
    time.sleep(1.0)
    run.snapshot("orphaned FIN_WAIT_2 with its tcp_fin_timeout timer")
    run.wait(client)
    return [
        conn(
            close_type="fin_then_reset",
            rst_by="client",
            rst_kind="reply_to_closed",
            time_wait_side="none",
        )
    ]


@scenario(
    "The client shuts down its sending side; the server keeps sending 5 x 1000 bytes over "
    "1 s, then closes."
)
def half_close(run: Run) -> list[dict]:
    stream = [x for _ in range(5) for x in ("sleep 0.2", "send 1000")]
    run.server(*EXCHANGE_S, "recv_eof", *stream, "close")
    run.client(run.connect(), *EXCHANGE_C, "shutdown_wr", "recv_eof", "close", "sleep 0.3")
    return [conn(client_state_end="TIME_WAIT", half_close_bytes=5000)]


@scenario(
    "The server never closes after the client's FIN: CLOSE_WAIT on the server, FIN_WAIT_2 "
    "on the client at the snapshot."
)
def close_wait_leak(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "hang")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 0.5")
    return [
        conn(
            close_type="half_closed",
            client_state_end="FIN_WAIT_2",
            server_state_end="CLOSE_WAIT",
            time_wait_side="none",
        )
    ]


LEAKY = {5, 13, 21}  # accept order of the connections the server forgets to close


@scenario(
    "30 sequential connections; the server closes 27 promptly and leaks 3 in CLOSE_WAIT.",
    aggregate=True,
)
def close_wait_many(run: Run) -> list[dict]:
    server = []
    for i in range(30):
        server += [*EXCHANGE_S, "recv_eof"] + ([] if i in LEAKY else ["close"])
    run.server(*server, "hang")
    client = [s for _ in range(30) for s in (run.connect(), *EXCHANGE_C, "close", "sleep 0.05")]
    run.client(*client, "sleep 0.3")
    return [
        conn(
            close_type="half_closed",
            client_state_end="FIN_WAIT_2",
            server_state_end="CLOSE_WAIT",
            time_wait_side="none",
        )
        if i in LEAKY
        else conn(close_type=("three_way", "four_way"), client_state_end="TIME_WAIT")
        for i in range(30)
    ]


@scenario("The client sets SO_LINGER 0 and closes: RST instead of FIN, no TIME_WAIT.")
def linger0_abort(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "close")
    run.client(run.connect(), *EXCHANGE_C, "linger0", "close", "sleep 0.3")
    return [
        conn(
            close_type="reset",
            active_closer="none",
            rst_by="client",
            rst_kind="abort",
            time_wait_side="none",
        )
    ]


@scenario("The server closes with 500 unread request bytes in its receive buffer: RST, not FIN.")
def unread_data_rst(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "sleep 0.3", "close")
    run.client(run.connect(), *EXCHANGE_C, "send 500", "recv_eof", "close", "sleep 0.3")
    return [
        conn(
            close_type="reset",
            active_closer="none",
            rst_by="server",
            rst_kind="abort",
            time_wait_side="none",
        )
    ]


@scenario(
    "The server closes first; the client keeps writing: the closed server socket answers "
    "the data with RST."
)
def data_to_closed(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "close")
    run.client(
        run.connect(),
        *EXCHANGE_C,
        "sleep 0.3",
        "send 100",
        "sleep 0.3",
        "send 100",
        "close",
        "sleep 0.3",
    )
    return [
        conn(
            close_type="fin_then_reset",
            active_closer="server",
            rst_by="server",
            rst_kind="reply_to_closed",
            time_wait_side="none",
        )
    ]


@scenario("SYN to a port nobody listens on: RST+ACK, connection refused.")
def refused(run: Run) -> list[dict]:
    run.client(f"connect {run.server_ip} 9", "sleep 0.2")
    return [
        conn(
            close_type="refused",
            active_closer="none",
            rst_by="server",
            rst_kind="refused",
            time_wait_side="none",
        )
    ]


@scenario(
    "The client, bound to source port 40001, closes first and reconnects on the same "
    "4-tuple 0.3 s later while it holds TIME_WAIT (tcp_tw_reuse=0).",
    sysctls={"client": {"net.ipv4.tcp_tw_reuse": "0"}},
)
def tw_reuse_client(run: Run) -> list[dict]:
    once_s = [*EXCHANGE_S, "recv_eof", "sleep 0.2", "close"]
    run.server(*once_s, *once_s)
    once_c = [run.connect(40001), *EXCHANGE_C, "close", "sleep 0.3"]
    run.client(*once_c, *once_c)
    return [conn(), conn(client_state_end="TIME_WAIT", reused_4tuple=True)]


@scenario(
    "The server closes first and holds TIME_WAIT; the client reconnects from the same "
    "source port 40002 0.3 s later and the server's TIME_WAIT accepts the new SYN."
)
def tw_reuse_server(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "sleep 0.1", "close", *EXCHANGE_S, "recv_eof", "sleep 0.2", "close")
    run.client(
        run.connect(40002),
        *EXCHANGE_C,
        "recv_eof",
        "sleep 0.2",
        "close",
        "sleep 0.3",
        run.connect(40002),
        *EXCHANGE_C,
        "close",
        "sleep 0.5",
    )
    return [
        conn(active_closer="server", time_wait_side="server"),
        conn(client_state_end="TIME_WAIT", reused_4tuple=True),
    ]


@scenario(
    "The client has one ephemeral port (ip_local_port_range 40000 40000) and "
    "tcp_tw_reuse=1: a connect 0.3 s after a client-first close fails (EADDRNOTAVAIL, "
    "nothing on the wire), one 1.3 s after reuses the TIME_WAIT 4-tuple.",
    sysctls={
        "client": {"net.ipv4.ip_local_port_range": "40000 40000", "net.ipv4.tcp_tw_reuse": "1"}
    },
)
def tw_reuse_ephemeral(run: Run) -> list[dict]:
    once_s = [*EXCHANGE_S, "recv_eof", "sleep 0.2", "close"]
    run.server(*once_s, *once_s)
    # tcp_tw_reuse needs the TIME_WAIT to be older than tcp_tw_reuse_delay (1000 ms).
    run.client(
        run.connect(),
        *EXCHANGE_C,
        "close",
        "sleep 0.3",
        run.connect(),
        "sleep 1.0",
        run.connect(),
        *EXCHANGE_C,
        "close",
        "sleep 0.5",
    )
    return [conn(), conn(client_state_end="TIME_WAIT", reused_4tuple=True)]


CW_PORT = 40003  # syn_meets_close_wait's fixed client port


def measure_syn_meets_close_wait(run: Run, segments: dict[str, list]) -> list[str]:
    """The SYN -> old ACK -> RST -> SYN retry exchange, checked and timed in each capture.

    The retry is not the 1 s initial RTO: a SYN_SENT socket that receives an unacceptable
    ACK re-arms its SYN timer to TCP_TIMEOUT_MIN (2 jiffies; tcp_rcv_synsent_state_process).
    """
    problems = []
    syn, ack_ = lab_pcap.SYN, lab_pcap.ACK
    for vantage, segs in segments.items():
        mine = [s for s in segs if CW_PORT in (s.sport, s.dport)]
        out = [s for s in mine if s.src == run.client_ip]
        back = [s for s in mine if s.src != run.client_ip]
        syns = [s for s in out if s.flags & (syn | ack_) == syn]
        isns = list(dict.fromkeys(s.seq for s in syns))
        if len(isns) != 2:
            problems.append(f"{vantage}: {len(isns)} client ISNs on port {CW_PORT}, designed 2")
            continue
        new = [s for s in syns if s.seq == isns[1]]
        fins = [s for s in out if s.flags & lab_pcap.FIN and s.ts < new[0].ts]
        old_end = (fins[0].seq + 1) % 2**32 if fins else None
        # The server's answer to the new SYN: an ACK of the old connection (of the old FIN).
        reply = next((s for s in back if s.ts >= new[0].ts), None)
        rst = next((s for s in out if s.flags & lab_pcap.RST), None)
        synack = next(
            (s for s in back if s.flags & (syn | ack_) == syn | ack_ and s.ts > new[0].ts), None
        )
        if reply is None or reply.flags != ack_ or reply.ack != old_end:
            problems.append(f"{vantage}: the new SYN was not answered by an ACK of the old FIN")
            continue
        if rst is None or rst.flags & ack_ or rst.seq != reply.ack or rst.ts < reply.ts:
            problems.append(f"{vantage}: no bare client RST with seq = that ACK's ack")
            continue
        if len(new) != 2 or synack is None or synack.ack != (isns[1] + 1) % 2**32:
            problems.append(
                f"{vantage}: {len(new)} SYNs with the new ISN, designed 2 (then SYN+ACK)"
            )
            continue
        t0 = new[0].ts
        run.notes.setdefault("exchange", {})[vantage] = {
            "new_syn_at": t0,
            "old_ack_after": round(reply.ts - t0, 6),
            "client_rst_after": round(rst.ts - t0, 6),
            "syn_retry_after": round(new[1].ts - t0, 6),
            "syn_ack_after": round(synack.ts - t0, 6),
            "new_isn_minus_old_isn": (isns[1] - isns[0]) % 2**32,
            "_old_fin_end": old_end,
        }
    client = run.notes.get("exchange", {}).get("client")
    if client:
        # The orphan's FIN_WAIT_2 began when the server's ACK of its FIN arrived (client.pcap);
        # ss was polled every 50 ms until the socket was gone.
        fin_end = client.pop("_old_fin_end")
        gone = run.notes["client_socket_gone_at"]
        acked = [
            s.ts
            for s in segments["client"]
            if s.src != run.client_ip and s.dport == CW_PORT and s.flags & ack_ and s.ack == fin_end
        ]
        if not acked or not acked[0] < gone < client["new_syn_at"]:
            problems.append("client: no ACK of the client's FIN before its orphan expired")
        else:
            run.notes["fin_wait2_entered_at"] = acked[0]
            run.notes["fin_wait2_lifetime_s"] = round(gone - acked[0], 3)
            run.notes["reconnect_after_gone_s"] = round(client["new_syn_at"] - gone, 3)
    for view in run.notes.get("exchange", {}).values():
        view.pop("_old_fin_end", None)
    return problems


@scenario(
    "The client, bound to source port 40003, closes first and the server never closes "
    "(CLOSE_WAIT); the client's orphaned FIN_WAIT_2 expires (tcp_fin_timeout=2) and it "
    "connects again from the same port: the server's CLOSE_WAIT answers the SYN with an ACK "
    "of the old connection, the client answers that with a bare RST (the CLOSE_WAIT is gone) "
    "and re-sends its SYN about 10 ms later, which succeeds; then a four-way close, client "
    "first.",
    sysctls={"client": {"net.ipv4.tcp_fin_timeout": "2"}},
    measure=measure_syn_meets_close_wait,
)
def syn_meets_close_wait(run: Run) -> list[dict]:
    # The server keeps the first socket open forever (never close()d, CLOSE_WAIT) and
    # accepts the second connection; "hang" keeps both fds until the lab kills it.
    run.server(*EXCHANGE_S, "recv_eof", *EXCHANGE_S, "recv_eof", "sleep 0.3", "close", "hang")
    client = run.client(
        run.connect(CW_PORT),
        *EXCHANGE_C,
        "close",
        f"touch {run.file('closed')}",
        f"wait {run.file('reconnect')}",
        run.connect(CW_PORT),
        *EXCHANGE_C,
        f"touch {run.file('second')}",
        f"wait {run.file('close2')}",
        "close",
        "sleep 0.5",
        wait=False,
    )
    run.wait_file("closed")
    run.notes["client_closed_at"] = time.time()
    time.sleep(0.2)
    run.snapshot("client orphaned FIN_WAIT_2 with its tcp_fin_timeout timer, server CLOSE_WAIT")
    run.notes["client_socket_gone_at"] = run.ss_gone("client", timeout=10)
    cli, srv = endpoint(run.client_ip, CW_PORT), endpoint(run.server_ip, PORT)
    run.snapshot("client orphan expired (not TIME_WAIT), server still CLOSE_WAIT")
    before = [
        r["state"] for r in run.snapshots[-1]["server"] if (r["local"], r["peer"]) == (srv, cli)
    ]
    if before != ["CLOSE_WAIT"]:
        run.problems.append(f"server socket before the new SYN: {before}, designed CLOSE_WAIT")
    run.file_touch("reconnect")
    run.wait_file("second")
    run.snapshot("second connection established; the old CLOSE_WAIT is gone")
    after = [
        r["state"] for r in run.snapshots[-1]["server"] if (r["local"], r["peer"]) == (srv, cli)
    ]
    if after != ["ESTABLISHED"] or any(
        r["state"] == "CLOSE_WAIT" for r in run.snapshots[-1]["server"]
    ):
        run.problems.append(
            f"server sockets after the reconnect: {after}, designed ESTABLISHED only"
        )
    run.file_touch("close2")
    run.wait(client)
    return [
        conn(
            close_type="fin_then_reset",
            rst_by="client",
            rst_kind="reply_to_closed",
            time_wait_side="none",
        ),
        conn(client_state_end="TIME_WAIT"),
    ]


@scenario(
    "Client keepalive (idle 1 s, interval 1 s, 3 probes); two probes are answered, then the "
    "router blackholes both directions; 3 unanswered probes, then the client sends RST.",
    # The RST never reaches the server: from the client and the router the server's state
    # cannot be known (ss says ESTABLISHED); the server never learns the client's.
    invisible={
        "client": ["server_state_end"],
        "middle": ["server_state_end"],
        "server": ["client_state_end"],
    },
)
def keepalive_dead_peer(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "hang")
    client = run.client(
        run.connect(),
        *EXCHANGE_C,
        "keepalive 1 1 3",
        f"touch {run.file('alive')}",
        "recv_eof",
        "close",
        wait=False,
    )
    run.wait_file("alive")
    time.sleep(2.5)
    run.snapshot("keepalive timer running, before the blackhole")
    run.add_fault(drop_all("blackhole", "ip saddr { 10.0.1.2, 10.0.2.2 }", drops=4))
    run.wait(client)
    return [
        conn(
            close_type="reset",
            active_closer="none",
            server_state_end="ESTABLISHED",
            rst_by="client",
            rst_kind="keepalive_timeout",
            time_wait_side="none",
            client_keepalives=5,
        )
    ]


@scenario(
    "Client keepalive (idle 1 s, interval 1 s, 3 probes) on an idle connection: three probes, "
    "each answered, then the client closes; the server closes back at once."
)
def keepalive_idle(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "close")
    run.client(run.connect(), *EXCHANGE_C, "keepalive 1 1 3", "sleep 3.5", "close", "sleep 0.3")
    return [conn(close_type="three_way", client_state_end="TIME_WAIT", client_keepalives=3)]


@scenario(
    "kill -9 of the server process holding two connections: its kernel sends FIN on the "
    "idle one and RST on the one with unread data."
)
def process_killed(run: Run) -> list[dict]:
    server = run.server(*EXCHANGE_S, *EXCHANGE_S, "hang")
    run.client(
        run.connect(),
        *EXCHANGE_C,
        run.connect(),
        *EXCHANGE_C,
        "send 300",
        f"touch {run.file('sent')}",
        "use 0",
        "recv_eof",
        "sleep 0.3",
        "close",
        "use 1",
        "recv_eof",
        "close",
        wait=False,
    )
    run.wait_file("sent")
    time.sleep(0.3)
    server.send_signal(signal.SIGKILL)
    run.wait(run.procs[-1][1])
    time.sleep(0.2)
    return [
        conn(active_closer="server", server_state_end="TIME_WAIT", time_wait_side="server"),
        conn(
            close_type="reset",
            active_closer="none",
            rst_by="server",
            rst_kind="abort",
            time_wait_side="none",
        ),
    ]


@scenario("A plain four-way close, client first, over IPv6.", family=6)
def ipv6(run: Run) -> list[dict]:
    run.server(*EXCHANGE_S, "recv_eof", "sleep 0.3", "close")
    run.client(run.connect(), *EXCHANGE_C, "close", "sleep 0.5")
    return [conn(client_state_end="TIME_WAIT")]


def http_server(run: Run, idle_timeout: str) -> None:
    """Start the lab's HTTP/1.1 server on PORT: it closes after 5 requests or `idle_timeout`
    seconds of silence."""
    server = run.spawn("server", "http_server", run.server_ip, str(PORT),
                       "--max-requests", "5", "--idle-timeout", idle_timeout)
    server.stdout.readline()  # {"event": "listening"}


HTTP_PLAN = ["close"] * 170 + ["idle"] * 15 + ["limit:5"] * 15


@scenario(
    "200 HTTP/1.1-like connections to one server port; the server closes first and piles "
    "up TIME_WAIT: 170 after `Connection: close`, 15 after a 1 s idle timeout, 15 after "
    "a 5-request limit.",
    aggregate=True,
)
def http_pileup(run: Run) -> list[dict]:
    http_server(run, idle_timeout="1.0")
    run.notes.update(request_limit=5, idle_timeout_s=1.0, plan=dict(Counter(HTTP_PLAN)))
    plan = HTTP_PLAN[:]
    random.Random(1).shuffle(plan)
    client = run.spawn("client", "http_client", run.server_ip, str(PORT), "--workers", "8", *plan)
    done = [json.loads(line) for line in run.wait(client).splitlines()]
    time.sleep(0.2)
    return [
        conn(
            client_port=e["port"],
            close_type=("three_way", "four_way"),
            active_closer="server",
            server_state_end="TIME_WAIT",
            time_wait_side="server",
            http=e["kind"],
        )
        for e in done
    ]


LOST_FIN_PORTS = (41001, 41002, 41003)  # below the client's ephemeral range in postmortem
POSTMORTEM_PLAN = (
    ["close"] * 100
    + ["limit:5"] * 20
    + ["client_close"] * 12
    + [f"client_close@{p}" for p in LOST_FIN_PORTS]
    + ["leak"] * 5
)


@scenario(
    "The project notebook's incident, on one server port: 120 server-first HTTP/1.1 closes "
    "(100 `Connection: close`, 20 after a 5-request limit) pile up server TIME_WAIT; 15 "
    "client-first closes answered within ~1 ms, 3 of them with the server's FIN (+ACK) "
    "dropped once; 5 connections the server never closes (CLOSE_WAIT leak).",
    sysctls={"client": {"net.ipv4.ip_local_port_range": "42000 60999"}},
    faults=[
        Fault(
            "wave3",
            drop_first(
                "wave3", f"{SERVER_FIN} tcp dport {{ {', '.join(map(str, LOST_FIN_PORTS))} }}"
            ).rules,
            drops=len(LOST_FIN_PORTS),
        )
    ],
    invisible={"client": ["lost_waves"]},
    aggregate=True,
)
def postmortem(run: Run) -> list[dict]:
    http_server(run, idle_timeout="30")
    plan = POSTMORTEM_PLAN[:]
    random.Random(7).shuffle(plan)
    run.notes.update(
        request_limit=5,
        plan=dict(Counter(p.partition("@")[0] for p in plan)),
        lost_fin_ports=list(LOST_FIN_PORTS),
    )
    client = run.spawn("client", "http_client", run.server_ip, str(PORT), "--workers", "8", *plan)
    done = [json.loads(line) for line in run.wait(client).splitlines()]
    time.sleep(0.5)  # the dropped FINs' retransmissions (~0.25 s) complete
    designed = []
    for e in done:
        if e["kind"] == "leak":
            d = conn(
                close_type="half_closed",
                client_state_end="FIN_WAIT_2",
                server_state_end="CLOSE_WAIT",
                time_wait_side="none",
            )
        elif e["kind"] == "client_close":
            lost = e["port"] in LOST_FIN_PORTS
            d = conn(
                close_type=("three_way", "four_way"),
                client_state_end="TIME_WAIT",
                server_fin_retransmits=1 if lost else 0,
                client_fin_retransmits=(0, 1) if lost else 0,
                # The server closes within ~1 ms, inside its delayed ACK: its FIN+ACK
                # carries waves 2 and 3, so dropping it loses both (the client re-sends
                # its FIN as well, unacknowledged).
                lost_waves=[2, 3] if lost else [],
            )
        else:
            d = conn(
                close_type=("three_way", "four_way"),
                active_closer="server",
                server_state_end="TIME_WAIT",
                time_wait_side="server",
            )
        designed.append(d | {"client_port": e["port"], "http": e["kind"]})
    return designed


# ---------------------------------------------------------------- command line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("sample_pcaps"))
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), metavar="NAME")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args()
    if args.list:
        for sc in SCENARIOS.values():
            print(f"{sc.name:24} {sc.description}")
        return
    if os.geteuid() != 0:
        sys.exit("tools/lab.py needs root (network namespaces, tcpdump, nftables)")
    # One lab at a time per machine: the namespace names are fixed and each run deletes them.
    lock_path = "/run/pf-lab.lock" if os.path.isdir("/run") else "/tmp/pf-lab.lock"
    failed = []
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in args.scenario or list(SCENARIOS):
            t = time.time()
            ok = run_scenario(SCENARIOS[name], args.out)
            print(f"{name:24} {'ok' if ok else 'MISMATCH'}  {time.time() - t:5.1f} s", flush=True)
            failed += [] if ok else [name]
    if failed:
        sys.exit(f"scenarios not matching their design: {', '.join(failed)}")


if __name__ == "__main__":
    main()
