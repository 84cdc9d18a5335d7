"""Compare pcapflow's Zeek columns with Zeek's own conn.log baselines.

    python tools/zeek_match.py [CORPUS_DIR]    # default ../shared/corpus/external/zeek

For every `expected/*.zeek_conn_tcp.tsv` (Zeek's TCP rows of its test baselines), run
pcapflow on the capture, compute `pcapflow.zeek.zeek_fields` per connection, match rows by
4-tuple (in order for repeated 4-tuples) and print agreement rates and every differing row.
Baselines made while Zeek validated TCP checksums (no `-C`, no `ignore_checksums`) are
flagged: pcapflow never checks checksums, so bad-checksum packets count there and not in Zeek.
"""
from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

import pcapflow
from pcapflow.analysis import FLOW_FIELDS
from pcapflow.teardown import Flow
from pcapflow.zeek import zeek_fields

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "external" / "zeek"
FIELDS = [("conn_state", "zeek_conn_state", "conn_state"), ("history", "zeek_history", "history"),
          ("orig_pkts", "orig_pkts", "pkts"), ("resp_pkts", "resp_pkts", "pkts"),
          ("orig_bytes", "orig_bytes", "bytes"), ("resp_bytes", "resp_bytes", "bytes")]
METRICS = ["conn_state", "history", "pkts", "bytes"]


def pcapflow_rows(capture: Path) -> list[dict]:
    """One dict per pcapflow connection: its 4-tuple and zeek_fields() of its segments from
    the analysis' own segment table, keeping the capture duplicates pcapflow drops from its
    Flows: Zeek sees and counts them (packet counts, retransmission letters)."""
    a = pcapflow.analyze(str(capture))
    rows = []
    for cid, seg in a.segments.groupby("conn", sort=True):
        c = a.connections.loc[cid]
        flow = Flow(**{k: seg[{"d": "dir"}.get(k, k)].to_numpy() for k in FLOW_FIELDS})
        rows.append({"conn_id": int(cid), "orig": (c.client_ip, int(c.client_port)),
                     "resp": (c.server_ip, int(c.server_port)),
                     **zeek_fields(flow, bool(c.roles_inferred))})
    return rows


def checksum_validated(testinfo: str, baseline: str) -> bool:
    """Whether the Zeek run that wrote this baseline validated TCP checksums."""
    runs = [ln for ln in testinfo.splitlines() if "@TEST-EXEC: zeek" in ln]
    name = baseline.rsplit("/", 1)[-1].split(".")[0]
    mine = [ln for ln in runs if name in ln] or runs
    return not any(re.search(r"\s-\w*C|ignore_checksums", ln) for ln in mine)


def baseline_rows(tsv: Path) -> list[dict]:
    """Zeek rows of one baseline file; when a capture has several baselines, the ones made
    with checksums ignored are preferred (they see what pcapflow sees)."""
    with open(tsv, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    info = tsv.with_name(tsv.name.replace(".zeek_conn_tcp.tsv", ".testinfo.txt")).read_text()
    for r in rows:
        r["validated"] = checksum_validated(info, r["baseline"])
    if len({r["baseline"] for r in rows}) > 1 and not all(r["validated"] for r in rows):
        rows = [r for r in rows if not r["validated"]]
    return rows


def match(zeek: list[dict], ours: list[dict]) -> tuple[list[tuple[dict, dict]], list, list]:
    """Pair rows by unordered 4-tuple, in order of appearance when a 4-tuple repeats; rows of
    baselines cut down to a few columns without the 4-tuple take pcapflow's rows in order."""
    pool = defaultdict(list)
    for r in ours:
        pool[frozenset([r["orig"], r["resp"]])].append(r)
    pairs, missing = [], []
    for z in zeek:
        if z["id.orig_p"]:
            key = frozenset([(z["id.orig_h"], int(z["id.orig_p"])),
                             (z["id.resp_h"], int(z["id.resp_p"]))])
        else:
            key = next((k for k, rs in pool.items() if rs), None)
        if pool.get(key):
            pairs.append((z, pool[key].pop(0)))
        else:
            missing.append(z)
    return pairs, missing, [r for rs in pool.values() for r in rs]


def ids(z: dict) -> str:
    return f"{z['id.orig_h']}:{z['id.orig_p']} > {z['id.resp_h']}:{z['id.resp_p']}"


def compare(z: dict, p: dict) -> dict[str, list[str]]:
    """Per metric, the differing fields as 'name zeek=... pcapflow=...' (metrics Zeek logged)."""
    out: dict[str, list[str]] = {}
    if z["id.orig_p"] and (z["id.orig_h"], int(z["id.orig_p"])) != p["orig"]:
        out["roles"] = [f"Zeek originator {z['id.orig_h']}:{z['id.orig_p']}, pcapflow {p['orig']}"]
    for zname, pname, metric in FIELDS:
        zv = z.get(zname, "")
        if zv == "":  # baseline cut down to a few columns
            continue
        pv = p[pname]
        pv = "-" if pv is None else str(pv)
        out.setdefault(metric, [])
        if zv != pv:
            out[metric].append(f"{zname} zeek={zv} pcapflow={pv}")
    return out


def compare_corpus(corpus: Path = DEFAULT) -> dict:
    """Agreement per metric ({metric: [agreeing, compared]}), the rows matched, the differing
    rows and the unmatched ones as (capture, text) pairs."""
    totals = {m: [0, 0] for m in METRICS}
    matched, diffs, unmatched = 0, [], []
    for tsv in sorted((corpus / "expected").glob("*.zeek_conn_tcp.tsv")):
        capture = corpus / tsv.name.replace(".zeek_conn_tcp.tsv", "")
        zeek = baseline_rows(tsv)
        try:
            ours = pcapflow_rows(capture)
        except Exception as e:  # noqa: BLE001 - one capture's crash must not hide the others
            unmatched.append((capture.name, f"pcapflow failed: {type(e).__name__}: {e}"))
            ours = []
        pairs, missing, extra = match(zeek, ours)
        matched += len(pairs)
        for z, p in pairs:
            res = compare(z, p)
            for m in METRICS:
                if m in res:
                    totals[m][0] += not res[m]
                    totals[m][1] += 1
            bad = [d for v in res.values() for d in v]
            if bad:
                note = " [baseline validated checksums]" if z["validated"] else ""
                diffs.append((capture.name, f"conn {p['conn_id']} {ids(z)}{note}: {'; '.join(bad)}"))
        unmatched += [(capture.name, f"Zeek row {ids(z)} {z['history']} not in pcapflow")
                      for z in missing]
        for r in extra:
            text = f"pcapflow conn {r['conn_id']} {r['orig']} > {r['resp']} {r['zeek_history']}"
            unmatched.append((capture.name, f"{text} not in Zeek's baseline"))
    return {"matched": matched, "totals": totals, "diffs": diffs, "unmatched": unmatched}


def main(corpus: Path = DEFAULT) -> None:
    r = compare_corpus(corpus)
    print(f"rows matched: {r['matched']}")
    for m, (ok, n) in r["totals"].items():
        print(f"{m:>10} agreement: {ok}/{n} = {100 * ok / max(n, 1):.1f}%")
    for title, rows in (("differing rows", r["diffs"]), ("unmatched rows", r["unmatched"])):
        print(f"\n{title}:")
        print("\n".join(f"  {cap}: {text}" for cap, text in rows) or "  none")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
