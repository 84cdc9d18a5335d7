"""pcapflow against the kernel's ground truth, for every lab scenario and vantage point.

Each fact of `truth.json` (close type, active closer, end states as `ss` reported them,
FIN retransmissions, lost waves, RST sender and kind, TIME_WAIT side, reuse...) must come
out of the capture taken at that point. Facts a vantage cannot see are listed in the
truth as invisible and not scored (tools/score.py prints the same as a table).
"""
import importlib.util
from pathlib import Path

import pytest

import pcapflow

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("score", ROOT / "tools" / "score.py")
score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(score)

SCENARIOS = sorted(p.parent for p in (ROOT / "sample_pcaps").glob("*/truth.json"))
VANTAGES = ("client", "middle", "server")


@pytest.mark.parametrize("vantage", VANTAGES)
@pytest.mark.parametrize("folder", SCENARIOS, ids=[f.name for f in SCENARIOS])
def test_every_fact_matches_the_kernel(folder, vantage):
    truth = score.load(folder)
    a = pcapflow.analyze(str(folder / truth["capture"]["vantages"][vantage]))
    results = [c for c in score.checks(folder, {v: a for v in VANTAGES}) if c[0] == vantage]
    assert results, "no fact checked"
    wrong = [f"{label} {fact}: expected {want!r}, got {got!r}"
             for _, label, fact, want, got in results if want != got]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", SCENARIOS, ids=[f.name for f in SCENARIOS])
def test_vantage_is_inferred_from_the_capture(folder):
    truth = score.load(folder)
    for vantage, fname in truth["capture"]["vantages"].items():
        c = pcapflow.analyze(str(folder / fname)).connections
        complete = c[c["handshake"] == "complete"]
        assert set(complete["vantage"]) <= {vantage}, fname


@pytest.mark.parametrize("folder", SCENARIOS, ids=[f.name for f in SCENARIOS])
def test_packet_accounting_adds_up(folder):
    truth = score.load(folder)
    for fname in truth["capture"]["vantages"].values():
        a = pcapflow.analyze(str(folder / fname))
        cap = a.captures[0]
        assert cap.packets == cap.tcp_packets + sum(cap.skipped.values())
        assert cap.tcp_packets == len(a.segments) == a.connections["packets"].sum() + \
            a.connections["duplicates"].sum()
