"""The command line as a user meets it: formats, SPEC fields, exit codes, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pcapflow import vocab

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_pcaps"
SPEC_CONNECTION_FIELDS = """conn_id client_ip client_port server_ip server_port roles_inferred
incarnation first_ts last_ts handshake vantage close_type active_closer client_state_end
server_state_end client_fin_ts server_fin_ts client_fin_retransmits server_fin_retransmits
client_fin_backoff server_fin_backoff lost_waves losses rst_by rst_kind time_wait_side
time_wait_start time_wait_end time_wait_restarts reused_4tuple reuse_gap_s reuse_check
half_close_bytes close_wait_s fin_wait2_s client_keepalives server_keepalives teardown_s
packets client_bytes server_bytes""".split()
SPEC_EVENT_FIELDS = ["conn_id", "ts", "side", "kind", "state_from", "state_to", "detail"]
SPEC_FINDING_FIELDS = ["kind", "severity", "host", "port", "count", "conn_ids", "summary",
                       "explanation", "suggestion"]


def pcapflow(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "pcapflow", *map(str, args)], capture_output=True,
                          text=True, input=stdin, cwd=ROOT, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def test_json_carries_every_spec_field_and_only_vocabulary_values():
    r = pcapflow("analyze", SAMPLE / "lost_wave4" / "client.pcap", SAMPLE / "refused" / "client.pcap",
                 "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "pcapflow/1" and len(doc["captures"]) == 2
    for cap in doc["captures"]:
        assert cap["packets"] == cap["tcp_packets"] + sum(cap["skipped"].values())
    assert len(doc["connections"]) == 2
    for conn in doc["connections"]:
        assert set(SPEC_CONNECTION_FIELDS) <= set(conn)
        assert conn["close_type"] in vocab.CLOSE_TYPES
        assert conn["client_state_end"] in vocab.STATES and conn["server_state_end"] in vocab.STATES
        assert conn["rst_kind"] is None or conn["rst_kind"] in vocab.RST_KINDS
    assert {e["kind"] for e in doc["events"]} <= set(vocab.EVENT_KINDS)
    assert all(set(SPEC_EVENT_FIELDS) <= set(e) for e in doc["events"])
    assert all(set(SPEC_FINDING_FIELDS) <= set(f) for f in doc["findings"])
    assert {f["severity"] for f in doc["findings"]} <= set(vocab.SEVERITIES)
    assert {f["kind"] for f in doc["findings"]} <= set(vocab.FINDING_KINDS)
    assert {x["position"] for c in doc["connections"] for x in c["losses"]} <= set(vocab.LOSS_POSITIONS)
    assert {c["vantage"] for c in doc["connections"]} <= set(vocab.VANTAGES)
    tw = [c for c in doc["connections"] if c["time_wait_restarts"] == 1]
    assert len(tw) == 1 and tw[0]["lost_waves"] == [4]


def test_table_fits_100_columns_and_names_the_teardown():
    r = pcapflow("analyze", SAMPLE / "postmortem" / "server.pcap", SAMPLE / "lost_wave1" / "client.pcap",
                 env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 100
    k = next(k for k, line in enumerate(lines) if "10.0.1.2:" in line and "four_way" in line)
    conn = lines[k] + lines[k + 1]  # notes that do not fit go on the next line
    assert "client" in conn and "TIME_WAIT" in conn and "lost w1" in conn and "cFINx2" in conn
    assert any("packets =" in line and "TCP" in line for line in lines)


def test_csv_and_parquet_hold_the_connections(tmp_path):
    out = tmp_path / "c.csv"
    r = pcapflow("analyze", SAMPLE / "http_pileup" / "server.pcap", "--format", "csv", "-o", out)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert len(df) == 200 and (df["time_wait_side"] == "server").all()
    pq = tmp_path / "c.parquet"
    r = pcapflow("analyze", SAMPLE / "http_pileup" / "server.pcap", "--format", "parquet", "-o", pq)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_parquet(pq)) == 200


def test_stdin_is_read_with_dash():
    data = (SAMPLE / "three_way" / "server.pcap").read_bytes()
    r = subprocess.run([sys.executable, "-m", "pcapflow", "analyze", "-", "--format", "csv"],
                       input=data, capture_output=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"three_way" in r.stdout


@pytest.mark.parametrize("make, reason", [
    (lambda p: p / "missing.pcap", "no such file"),
    (lambda p: p, "is a directory"),
    (lambda p: (p / "t.txt").write_text("hello, not a capture\n") and p / "t.txt", "not a pcap"),
    (lambda p: (p / "e.pcap").write_bytes(b"") or p / "e.pcap", "empty"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, reason):
    r = pcapflow("analyze", make(tmp_path))
    assert r.returncode == 2
    assert reason in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_bad_filter_is_exit_2():
    r = pcapflow("analyze", SAMPLE / "refused" / "client.pcap", "--filter", "hots 1.2.3.4")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_filter_keeps_matching_connections():
    r = pcapflow("analyze", SAMPLE / "process_killed" / "server.pcap", "--format", "csv",
                 "--filter", "port 8080 and not host 10.9.9.9")
    assert r.returncode == 0 and r.stdout.count("\n") == 3
    r = pcapflow("analyze", SAMPLE / "process_killed" / "server.pcap", "--format", "csv",
                 "--filter", "port 9")
    assert r.returncode == 0 and r.stdout.count("\n") == 1


def test_truncated_capture_is_analyzed_with_a_warning(tmp_path):
    data = (SAMPLE / "four_way_client_first" / "client.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-30])
    r = pcapflow("analyze", cut, "--format", "json")
    assert r.returncode == 0
    assert "warning" in r.stderr and "cut short" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["captures"][0]["truncated"] and doc["captures"][0]["packets"] >= 9


def test_states_prints_netstat_like_counts():
    r = pcapflow("states", SAMPLE / "close_wait_many" / "server.pcap")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "10.0.2.2" in text and "CLOSE_WAIT" in text
    line = next(x for x in text.splitlines() if "CLOSE_WAIT" in x)
    assert line.split()[-1] == "3"


def test_show_tells_one_connection():
    r = pcapflow("show", SAMPLE / "lost_wave4" / "client.pcap", "0")
    assert r.returncode == 0, r.stderr
    assert "TW_REACK" in r.stdout and "FIN_WAIT_2 -> TIME_WAIT" in r.stdout
    r = pcapflow("show", SAMPLE / "lost_wave4" / "client.pcap", "99")
    assert r.returncode == 2 and "no connection 99" in r.stderr


def test_readme_vocabulary_section_is_generated_from_vocab():
    import importlib.util
    spec = importlib.util.spec_from_file_location("vocab_doc", ROOT / "tools" / "vocab_doc.py")
    doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(doc)
    assert doc.section() in (ROOT / "README.md").read_text()
    for names in (vocab.CLOSE_TYPES, vocab.RST_KINDS, vocab.FINDING_KINDS, vocab.SKIP_REASONS):
        assert all(f"| `{name}` |" in doc.section() for name in names)


def test_corrupt_gzip_is_a_one_line_error(tmp_path):
    import gzip
    data = bytearray(gzip.compress((SAMPLE / "refused" / "client.pcap").read_bytes()))
    data[30:40] = b"x" * 10
    bad = tmp_path / "bad.pcap.gz"
    bad.write_bytes(bytes(data))
    r = pcapflow("analyze", bad)
    assert r.returncode == 2 and "compressed stream broken" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def on_a_terminal(*args: str) -> tuple[subprocess.CompletedProcess, bytes]:
    """pcapflow run with its stderr on a pseudo-terminal: the result, and what it showed."""
    import pty
    leader, follower = pty.openpty()
    p = subprocess.run([sys.executable, "-m", "pcapflow", *args],
                       stdout=subprocess.PIPE, stderr=follower, cwd=ROOT, timeout=120)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return p, shown


def test_progress_bars_on_a_terminal_only():
    out = SAMPLE / "http_pileup" / "server.pcap"
    p, shown = on_a_terminal("analyze", str(out), "--format", "csv")
    assert p.returncode == 0
    assert b"reading" in shown and b"analyzing" in shown and b"100%" in shown
    p, shown = on_a_terminal("analyze", str(out), "--format", "json", "--low-memory")
    assert p.returncode == 0 and p.stdout.startswith(b'{"schema"')
    assert b"reading" in shown and b"analyzing" in shown and b"writing" in shown and b"100%" in shown
    quiet = pcapflow("analyze", out, "--format", "csv")
    assert quiet.stderr == ""  # not a terminal: no bar


def test_states_explain_breaks_counts_down_by_port_and_closer():
    r = pcapflow("states", SAMPLE / "postmortem" / "server.pcap", "--explain", "--host", "10.0.2.2")
    assert r.returncode == 0, r.stderr
    ss = json.loads((SAMPLE / "postmortem" / "truth.json").read_text())["ss"]["server"]
    tw = sum(s["state"] == "TIME_WAIT" for s in ss)
    cw = sum(s["state"] == "CLOSE_WAIT" for s in ss)
    assert f":8080 <- 10.0.1.2: {tw}; this host closed first {tw}" in r.stdout
    assert f":8080 <- 10.0.1.2: {cw}; peer closed first {cw}" in r.stdout
    assert "10.0.1.2\n" not in r.stdout  # --host keeps one host
