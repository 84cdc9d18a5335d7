"""The real-kernel lab, live: run a few of its fastest scenarios into a temporary folder and
score pcapflow against the fresh truth, exactly as tests/test_sample_truth.py scores the
committed corpus.

Needs root, network namespaces and the lab's tools (iproute2, tcpdump, nftables,
iptables-legacy, ethtool, procps); skipped otherwise. About 10 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pcapflow

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("score", ROOT / "tools" / "score.py")
score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(score)

SCENARIOS = ("four_way_client_first", "refused", "lost_wave4")
VANTAGES = ("client", "middle", "server")
TOOLS = ("ip", "tcpdump", "nft", "iptables-legacy", "ip6tables-legacy", "ethtool", "ss", "sysctl")


def _why_not() -> str | None:
    """Why the lab cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, tcpdump, nftables)"
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        return f"the lab needs {', '.join(missing)} on PATH"
    probe = f"pf-probe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if res.returncode:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """Run the lab once for every scenario of this module; return the output folder."""
    out = tmp_path_factory.mktemp("lab")
    cmd = [sys.executable, str(ROOT / "tools" / "lab.py"), "--out", str(out)]
    for name in SCENARIOS:
        cmd += ["--scenario", name]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert res.returncode == 0, f"lab failed:\n{res.stdout}\n{res.stderr}"
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_lab_produced_what_it_designed(lab, name):
    truth = json.loads((lab / name / "truth.json").read_text())
    assert truth["lab_check"]["ok"], truth["lab_check"]["mismatches"]
    for fname in truth["capture"]["vantages"].values():
        assert (lab / name / fname).stat().st_size > 24, fname  # more than a pcap header


@pytest.mark.parametrize("vantage", VANTAGES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_fact_matches_the_kernel_live(lab, name, vantage):
    folder = lab / name
    truth = score.load(folder)
    a = pcapflow.analyze(str(folder / truth["capture"]["vantages"][vantage]))
    results = [c for c in score.checks(folder, {v: a for v in VANTAGES}) if c[0] == vantage]
    assert results, "no fact checked"
    wrong = [
        f"{label} {fact}: expected {want!r}, got {got!r}"
        for _, label, fact, want, got in results
        if want != got
    ]
    assert not wrong, "\n".join(wrong)
