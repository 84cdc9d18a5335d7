#!/usr/bin/env python3
"""Score pcapflow against the lab's ground truth: scenario x vantage x fact.

    python tools/score.py [sample_pcaps] [--scenario NAME ...] [--failures]

For every scenario folder (truth.json + client/router/server.pcap) and each vantage, runs
pcapflow on that capture alone and compares each expected fact of each connection
(`expect`, overridden per vantage; facts a vantage cannot see are listed as invisible and
not scored). Prints one line per scenario and vantage, and the total.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pcapflow

NOT_COLUMNS = {"http"}  # truth keys that describe the scenario rather than a connection column


def load(folder: Path) -> dict:
    return json.loads((folder / "truth.json").read_text())


def checks(folder: Path, analyses: dict | None = None):
    """Yield (vantage, conn label, fact, expected, got) for one scenario folder."""
    truth = load(folder)
    for vantage, fname in truth["capture"]["vantages"].items():
        a = (analyses or {}).get(vantage) or pcapflow.analyze(str(folder / fname))
        table = a.connections
        for conn in truth["connections"]:
            label = f"{conn['client_port']}->{conn['server_port']}#{conn.get('incarnation', 0)}"
            hit = table[(table["client_port"] == conn["client_port"])
                        & (table["server_port"] == conn["server_port"])
                        & (table["incarnation"] == conn.get("incarnation", 0))]
            override = dict(conn.get("vantage", {}).get(vantage, {}))
            invisible = set(override.pop("invisible", []))
            expect = {**conn["expect"], **override}
            if hit.empty:
                yield vantage, label, "connection found", True, False
                continue
            row = hit.iloc[0]
            for fact, want in expect.items():
                if fact in NOT_COLUMNS or fact in invisible or fact not in row.index:
                    continue
                got = row[fact]
                got = list(got) if isinstance(got, (list, tuple)) else got
                if hasattr(got, "item"):
                    got = got.item()
                if isinstance(got, float) and math.isnan(got):
                    got = None
                yield vantage, label, fact, want, got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="sample_pcaps")
    ap.add_argument("--scenario", action="append")
    ap.add_argument("--failures", action="store_true", help="list every mismatch")
    args = ap.parse_args(argv)
    folders = sorted(p.parent for p in Path(args.root).glob("*/truth.json"))
    if args.scenario:
        folders = [f for f in folders if f.name in args.scenario]
    total = Counter()
    print(f"{'scenario':<22} {'client':>9} {'middle':>9} {'server':>9}")
    for folder in folders:
        per = {}
        fails = []
        for vantage, label, fact, want, got in checks(folder):
            ok = want == got
            c = per.setdefault(vantage, Counter())
            c["ok" if ok else "bad"] += 1
            total["ok" if ok else "bad"] += 1
            if not ok:
                fails.append(f"    {vantage:<7} {label:<18} {fact}: expected {want!r}, got {got!r}")
        cells = [f"{per.get(v, Counter())['ok']}/{sum(per.get(v, Counter()).values())}"
                 for v in ("client", "middle", "server")]
        print(f"{folder.name:<22} {cells[0]:>9} {cells[1]:>9} {cells[2]:>9}")
        if args.failures:
            print("\n".join(fails)) if fails else None
    n = sum(total.values())
    print(f"facts matched: {total['ok']}/{n} ({100 * total['ok'] / max(n, 1):.1f}%)")
    return 0 if total["bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
