"""Fuzzing the reader and the whole analysis with mutated real captures (hypothesis).

Seeds are the real captures of tests/data/ and sample_pcaps/ (the first records of each).
A mutation overwrites bytes or 32-bit words (lengths, magic numbers), truncates, or works on
whole records / pcapng blocks: drop, repeat, swap, or splice one in from another capture.
Whatever the input, only CaptureError may escape, nothing may hang, and every packet read
is counted: packets = tcp_packets + sum(skipped).

CI runs a bounded, derandomized budget (about 30 s). For a longer, random run:
    PCAPFLOW_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py
Every crash found becomes a file of tools/make_malformed.py, tested by tests/test_malformed.py.
"""
from __future__ import annotations

import io
import math
import os
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pcapflow
from pcapflow.capture import SKIP_REASONS, CaptureError, read_captures
from pcapflow.report.table import render

ROOT = Path(__file__).resolve().parents[1]
LONG = "PCAPFLOW_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("PCAPFLOW_FUZZ_EXAMPLES", "0")) or None
SEED_RECORDS = 40  # records kept of each seed: mutations stay near the interesting bytes
EXAMPLE_SECONDS = 30  # one example taking longer is a hang
WORDS = [0, 1, 12, 13, 16, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFC, 0xFFFF_FFFF]


def chunks(raw: bytes) -> list[bytes]:
    """A little-endian pcap as header + records, a pcapng as blocks, anything else whole."""
    if raw[:4] == b"\xd4\xc3\xb2\xa1":
        out, pos, length = [raw[:24]], 24, lambda p: 16 + struct.unpack_from("<I", raw, p + 8)[0]
    elif raw[:4] == b"\x0a\x0d\x0d\x0a":
        out, pos, length = [], 0, lambda p: struct.unpack_from("<I", raw, p + 4)[0]
    else:
        return [raw]
    while pos < len(raw) and len(out) <= SEED_RECORDS:
        n = length(pos)
        out.append(raw[pos:pos + n])
        pos += n
    return out


SEED_FILES = sorted(p for p in (ROOT / "tests" / "data").iterdir()
                    if not p.name.endswith((".bz2", ".xz"))) + sorted(
    (ROOT / "sample_pcaps").glob("*/client.pcap"))
SEEDS = {p.relative_to(ROOT).as_posix(): chunks(p.read_bytes()) for p in SEED_FILES}


@st.composite
def mutated_capture(draw) -> bytes:
    parts = list(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["bytes", "word", "truncate", "drop", "repeat", "swap", "splice"]))
        i = draw(st.integers(0, len(parts) - 1))
        part = bytearray(parts[i])
        if op in ("bytes", "word", "truncate") and not part:
            continue
        at = draw(st.integers(0, len(part) - 1)) if part else 0
        if op == "bytes":
            new = draw(st.binary(min_size=1, max_size=8))
            part[at:at + len(new)] = new
        elif op == "word":
            part[at:at + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), draw(st.sampled_from(WORDS)))
        elif op == "truncate":
            parts, part = parts[:i], part[:at]
        if op in ("bytes", "word", "truncate"):
            parts[i:i + 1] = [bytes(part)]
        elif op == "drop":
            del parts[i]
        elif op == "repeat":
            parts.insert(draw(st.integers(0, len(parts))), parts[i])
        elif op == "swap":
            j = draw(st.integers(0, len(parts) - 1))
            parts[i], parts[j] = parts[j], parts[i]
        else:
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            parts.insert(i, other[draw(st.integers(0, len(other) - 1))])
        if not parts:
            break
    return b"".join(parts)


@contextmanager
def no_hang(seconds: int = EXAMPLE_SECONDS):
    """Turn an example that runs for `seconds` into a failure (SIGALRM), not a hung suite."""
    def fail(*_):
        raise TimeoutError(f"example ran {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_accounting(captures) -> None:
    for cap in captures:
        assert cap.packets == cap.tcp_packets + sum(cap.skipped.values()), cap
        assert set(cap.skipped) <= set(SKIP_REASONS)
        for ts in (cap.first_ts, cap.last_ts):
            assert ts is None or math.isfinite(ts)


def budget(ci_examples: int):
    """Hypothesis settings: a fixed, derandomized budget in CI; PCAPFLOW_FUZZ_EXAMPLES, random, locally."""
    return settings(max_examples=EXAMPLES or ci_examples, deadline=None, derandomize=not LONG,
                    database=None if not LONG else settings.default.database,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@budget(ci_examples=4000)
@given(mutated_capture())
def test_reader_only_raises_capture_error_and_counts_every_packet(data):
    with no_hang():
        try:
            segments, captures = read_captures(io.BytesIO(data))
        except CaptureError:
            event("not a capture")
            return
    event("cut short" if captures[0].truncated else "read to the end")
    check_accounting(captures)
    assert sum(c.tcp_packets for c in captures) == len(segments)
    assert segments["ts"].map(math.isfinite).all()


@budget(ci_examples=1000)
@given(st.lists(mutated_capture(), min_size=1, max_size=2))
def test_analysis_only_raises_capture_error_and_counts_every_packet(captures):
    with no_hang():
        try:
            a = pcapflow.analyze([io.BytesIO(c) for c in captures])
        except CaptureError:
            event("not a capture")
            return
        event(f"analyzed, {min(len(a.connections), 5)}+ connections")
        a.to_json()  # connections, events and findings, as the CLI prints them
        render(a)
    check_accounting(a.captures)
