"""`pcapflow batch`: rotated files of one vantage point are one timeline, on a pool or a cluster."""
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import pcapflow
from pcapflow import batch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_pcaps"
PILEUP = SAMPLE / "http_pileup" / "server.pcap"  # 200 connections
LOSSY = SAMPLE / "lost_wave4" / "client.pcap"     # a lost last ACK and its FIN retransmission
WHOLE = {"by_count": PILEUP, "by_time": PILEUP, "lossy": LOSSY}


def split(capture: Path, into: Path, *how: str) -> list[Path]:
    """Rotate a capture like tcpdump -C / -G would, with editcap."""
    into.mkdir(parents=True)
    subprocess.run(["editcap", *how, str(capture), str(into / "cap.pcap")], check=True)
    return sorted(into.iterdir())


def gzip_file(path: Path) -> None:
    with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Three vantage points as directories of rotated pieces, some gzipped, with a repeated
    piece (same bytes under another name) and a merge of two pieces (overlapping times)."""
    root = tmp_path_factory.mktemp("archive")
    pieces = split(PILEUP, root / "by_count", "-c", "50")
    for p in pieces[3::4]:
        gzip_file(p)
    shutil.copy(pieces[1], root / "by_count" / "again.pcap")
    pieces = split(PILEUP, root / "by_time", "-i", "1")
    subprocess.run(["mergecap", "-w", str(root / "by_time" / "merged.pcapng"),
                    str(pieces[1]), str(pieces[2])], check=True)
    split(LOSSY, root / "lossy", "-i", "0.2")
    return root


@pytest.fixture(scope="module")
def pooled(archive, tmp_path_factory) -> tuple[Path, batch.BatchResult]:
    out = tmp_path_factory.mktemp("pooled")
    return out, batch.run([archive], out, jobs=2, partitions=3)


def tables(out: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(out / t) for t in batch.TABLES}


def group_table(out: Path, table: str, group: str) -> pd.DataFrame:
    df = pd.read_parquet(out / table)
    return df[df["group"].str.endswith(os.sep + group)].drop(columns="group").reset_index(drop=True)


def as_written(df: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    """A DataFrame through the same Parquet writer, to compare like with like."""
    batch.write_table(df, str(tmp_path / "expected.parquet"))
    return pd.read_parquet(tmp_path / "expected.parquet")


def assert_same_values(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal cell by cell; a column of one group alone may be typed null where the dataset
    of all groups types it string (None there, NaN here)."""
    def plain(df):
        return df.astype(object).where(df.notna(), None)
    pd.testing.assert_frame_equal(plain(got), plain(expected))


@pytest.mark.parametrize("group", sorted(WHOLE))
def test_rotated_pieces_give_exactly_the_whole_captures_analysis(pooled, group, tmp_path):
    out, result = pooled
    assert result.groups == 3 and not result.failed
    whole = pcapflow.analyze(WHOLE[group])
    for table in ("connections", "events", "findings"):
        assert_same_values(group_table(out, table, group), as_written(getattr(whole, table), tmp_path))
    ends = group_table(out, "files", group)["last_ts"].dropna().to_numpy()
    crossing = [((ends >= first) & (ends < last)).any()
                for first, last in zip(whole.connections.first_ts, whole.connections.last_ts)]
    assert sum(crossing) >= 1  # some connections' packets lie in two files or more


def test_repeated_and_overlapping_files_are_reported_and_counted_once(pooled):
    files = tables(pooled[0])["files"].set_index("path")
    copies = files["duplicate_of"].dropna()  # same bytes: one is analyzed, the other named
    assert len(copies) == 1
    pair = {copies.index[0], copies.iloc[0]}
    assert any(p.endswith("again.pcap") for p in pair) and files.loc[list(pair), "sha256"].nunique() == 1
    merged = files.loc[next(p for p in files.index if p.endswith("merged.pcapng"))]
    assert len(merged["overlaps"]) == 2
    repeats = files["skipped"].map(lambda s: dict(s).get(batch.REPEAT, 0))
    assert repeats.sum() == merged["packets"]  # every packet of the merge was already there


def test_dask_cluster_gives_the_same_tables_as_the_local_pool(archive, pooled, tmp_path):
    from distributed import LocalCluster
    with LocalCluster(n_workers=2, processes=False, dashboard_address=None) as cluster:
        result = batch.run([archive], tmp_path, scheduler=cluster.scheduler_address, partitions=2)
    assert result.connections == pooled[1].connections
    for name, df in tables(tmp_path).items():
        pd.testing.assert_frame_equal(df, tables(pooled[0])[name])


def test_rerun_after_a_new_file_recomputes_only_its_group(archive, tmp_path):
    grown = tmp_path / "archive"
    shutil.copytree(archive, grown)
    last = max((grown / "by_time").glob("cap_*"))
    last.rename(tmp_path / last.name)
    out = tmp_path / "out"
    first = batch.run([grown], out, jobs=2)
    assert (first.recomputed, first.unchanged) == (3, 0)
    (tmp_path / last.name).rename(last)
    again = batch.run([grown], out, jobs=2)
    assert (again.recomputed, again.unchanged) == (1, 2)
    clean = batch.run([grown], tmp_path / "clean", jobs=2)
    for name, df in tables(Path(clean.out_dir)).items():
        pd.testing.assert_frame_equal(tables(out)[name], df)
    assert batch.run([grown], out, jobs=2).recomputed == 0
    os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 10**9))  # rewritten
    assert batch.run([grown], out, jobs=2).recomputed == 1


def test_corrupt_files_are_reported_the_rest_analyzed_exit_3(tmp_path):
    split(LOSSY, tmp_path / "lossy", "-c", "3")
    (tmp_path / "lossy" / "cap_random.pcap").write_bytes(os.urandom(3000))
    (tmp_path / "lossy" / "cap_cut.pcap").write_bytes(PILEUP.read_bytes()[:10])
    r = subprocess.run([sys.executable, "-m", "pcapflow", "batch", str(tmp_path / "lossy"),
                        "-o", str(tmp_path / "out"), "--jobs", "2"], check=False, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "cap_random.pcap: not a pcap or pcapng file" in r.stdout and "cap_cut.pcap" in r.stdout
    files = pd.read_parquet(tmp_path / "out" / "files").set_index("path")
    assert files["error"].notna().sum() == 2
    assert len(pd.read_parquet(tmp_path / "out" / "connections")) == 1


def test_no_capture_found_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no packets here")
    r = subprocess.run([sys.executable, "-m", "pcapflow", "batch", str(tmp_path), "-o",
                        str(tmp_path / "out")], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and "no capture files found" in r.stderr


def test_tables_merged_a_slice_at_a_time_keep_the_whole_captures_order(tmp_path, monkeypatch):
    """Partitions spill their events in slices of 50 rows and their connections in slices of
    7 (the pool's workers fork with the patched sizes); the merge must still give analyze's
    conn_id and (ts, conn_id) orders exactly, and the same findings."""
    monkeypatch.setattr(batch, "EVENTS_HELD", 50 * 4)
    monkeypatch.setattr(batch, "CONNECTIONS_HELD", 7 * 4)
    monkeypatch.setattr(batch, "LEAST_SLICE", 1)
    out = tmp_path / "out"
    batch.run([PILEUP], out, jobs=2, partitions=4)
    whole = pcapflow.analyze(PILEUP)
    assert len(whole.events) > 50 * 4 * 3  # several slices in every partition
    assert len(whole.connections) > 7 * 4 * 3
    for table in ("connections", "events", "findings"):
        got = pd.read_parquet(out / table).drop(columns="group").reset_index(drop=True)
        assert_same_values(got, as_written(getattr(whole, table), tmp_path))


SSH = ROOT.parent / "shared" / "corpus" / "external" / "zeek" / "ssh__ssh.pcap"


@pytest.mark.skipif(not SSH.exists(), reason="external corpus absent")
def test_vantage_votes_count_over_the_whole_timeline_not_a_partition(tmp_path):
    """Zeek's ssh.pcap has connections whose own packets cannot place the capture point
    (handshakes too fast to time, initial TTLs both ways): they take the side the other
    connections of their hosts voted for. Partitioned, those votes must still be the whole
    capture's, else four connections say "unknown" where analyze says "client"."""
    whole = pcapflow.analyze(SSH)
    voted = whole.connections.loc[whole.undecided]
    assert len(voted) >= 4 and voted["vantage"].isin(["client", "server"]).all()
    batch.run([SSH], tmp_path, jobs=1, partitions=16)
    got = pd.read_parquet(tmp_path / "connections")
    assert got["vantage"].tolist() == whole.connections["vantage"].tolist()


LOW_MEMORY = [PILEUP, LOSSY, SAMPLE / "ipv6" / "client.pcap", SSH]


@pytest.mark.parametrize("capture", LOW_MEMORY, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_low_memory_analyze_writes_the_same_bytes(capture, fmt, tmp_path, monkeypatch):
    """`analyze --low-memory` partitions the capture (here into 6, merged 5 connections and
    20 events at a time) and must write analyze's document byte for byte."""
    if not capture.exists():
        pytest.skip("external corpus absent")
    from click.testing import CliRunner

    from pcapflow.cli import cli
    monkeypatch.setattr(batch, "BYTES_PER_PARTITION", os.path.getsize(capture) // 6 + 1)
    monkeypatch.setattr(batch, "CONNECTIONS_HELD", 5)
    monkeypatch.setattr(batch, "LEAST_SLICE", 1)
    monkeypatch.setattr(batch, "EVENTS_HELD", 20)
    outs = []
    for extra in ([], ["--low-memory"]):
        outs.append(tmp_path / f"out{len(outs)}.{fmt}")
        r = CliRunner().invoke(cli, ["analyze", str(capture), "--format", fmt, "-o", str(outs[-1]), *extra])
        assert r.exit_code == 0, r.output
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_low_memory_analyze_of_rotated_files_with_a_filter(archive, tmp_path):
    """Several files are one timeline, a filter counts what it drops in each file's
    accounting: the document is analyze's."""
    pieces = sorted(str(p) for p in (archive / "lossy").iterdir())
    docs = []
    for extra in ([], ["--low-memory"]):
        docs.append(tmp_path / f"doc{len(docs)}.json")
        subprocess.run([sys.executable, "-m", "pcapflow", "analyze", *pieces, "--filter", "port 80",
                        "--format", "json", "-o", str(docs[-1]), *extra], check=True)
    assert docs[0].read_bytes() == docs[1].read_bytes()
    captures = pcapflow.analyze(pieces, filter="port 80").captures
    assert sum(c.skipped.get("filtered", 0) for c in captures) > 0  # the filter dropped some


def test_low_memory_refuses_what_it_cannot_stream(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pcapflow", "analyze", str(PILEUP), "--low-memory"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--low-memory writes --format json or csv" in r.stderr
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    r = subprocess.run([sys.executable, "-m", "pcapflow", "analyze", str(bad), "--low-memory",
                        "--format", "json"], capture_output=True, text=True)
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_low_memory_sizes_partitions_by_packets_too(tmp_path):
    """A capture of tiny packets (a SYN/RST storm: ~80 bytes a record) needs more partitions
    than its bytes say: the packets are guessed from the first records of a plain pcap."""
    size = os.path.getsize(PILEUP)
    with open(PILEUP, "rb") as fh:
        head = fh.read(1 << 20)
    packets = pcapflow.analyze(PILEUP).captures[0].packets
    assert abs(batch._packets_guessed(head, size) - packets) <= 0.2 * packets
    assert batch._packets_guessed(head[:100], size) > 0  # a few records suffice
    pcapng = tmp_path / "x.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(PILEUP), str(pcapng)], check=True)
    assert batch._packets_guessed(pcapng.read_bytes()[:1 << 20], size) == 0  # not guessed


def test_low_memory_without_pyarrow_says_what_to_install():
    code = ("import sys; sys.modules['pyarrow'] = None; "  # import pyarrow now fails
            "sys.argv = ['pcapflow', 'analyze', sys.argv[1], '--low-memory', '--format', 'json']; "
            "from pcapflow.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, str(PILEUP)], capture_output=True, text=True)
    assert r.returncode == 2 and "--low-memory needs pyarrow: pip install 'pcapflow[parquet]'" in r.stderr
    assert "Traceback" not in r.stderr
