"""The TCP connection automaton of one endpoint (RFC 9293 section 3.3.2), as a table.

Sans-IO in the manner of h11's `_state.py`: everything that moves a state lives in
`TRANSITIONS`; this module knows nothing of captures, pandas, roles or the capture point.
An `Endpoint` is driven by what that endpoint sent and received, and remembers when
each transition happened, so its state at any instant can be asked afterwards.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Inputs to one endpoint's automaton.
SEND_SYN = "send SYN"
RECV_SYN = "receive SYN"
RECV_SYNACK = "receive SYN-ACK"
RECV_ACK_OF_SYN = "receive ACK of SYN"
SEND_FIN = "send FIN"
RECV_FIN = "receive FIN"
RECV_ACK_OF_FIN = "receive ACK of FIN"
SEND_RST = "send RST"
RECV_RST = "receive RST"
TIMEWAIT_EXPIRED = "2MSL timer expired"
FIN_WAIT2_EXPIRED = "tcp_fin_timeout expired"
RETRIES_EXHAUSTED = "FIN retransmissions exhausted"  # tcp_orphan_retries: socket destroyed silently
LOST_TRACK = "cannot tell"  # the capture point has no proof of what this endpoint received
TW_REPLACED = "new SYN on the 4-tuple"  # TIME_WAIT slot taken by a new incarnation (tw_reuse, RFC 6191)

RESETTABLE = ("LISTEN", "SYN_SENT", "SYN_RECEIVED", "ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2",
              "CLOSING", "TIME_WAIT", "CLOSE_WAIT", "LAST_ACK", "UNKNOWN")

TRANSITIONS: dict[tuple[str, str], str] = {
    ("CLOSED", SEND_SYN): "SYN_SENT",
    ("LISTEN", RECV_SYN): "SYN_RECEIVED",
    ("SYN_SENT", RECV_SYNACK): "ESTABLISHED",
    ("SYN_RECEIVED", RECV_ACK_OF_SYN): "ESTABLISHED",
    # Closing first (active close).
    ("SYN_RECEIVED", SEND_FIN): "FIN_WAIT_1",
    ("ESTABLISHED", SEND_FIN): "FIN_WAIT_1",
    ("FIN_WAIT_1", RECV_ACK_OF_FIN): "FIN_WAIT_2",
    ("FIN_WAIT_2", RECV_FIN): "TIME_WAIT",
    ("FIN_WAIT_2", FIN_WAIT2_EXPIRED): "CLOSED",
    # Both FINs crossed (simultaneous close).
    ("FIN_WAIT_1", RECV_FIN): "CLOSING",
    ("CLOSING", RECV_ACK_OF_FIN): "TIME_WAIT",
    ("TIME_WAIT", TIMEWAIT_EXPIRED): "CLOSED",
    ("TIME_WAIT", TW_REPLACED): "CLOSED",
    # Closing second (passive close).
    ("SYN_RECEIVED", RECV_FIN): "CLOSE_WAIT",
    ("ESTABLISHED", RECV_FIN): "CLOSE_WAIT",
    ("CLOSE_WAIT", SEND_FIN): "LAST_ACK",
    ("LAST_ACK", RECV_ACK_OF_FIN): "CLOSED",
    # An orphan whose FIN is never acknowledged is destroyed after tcp_orphan_retries.
    ("FIN_WAIT_1", RETRIES_EXHAUSTED): "CLOSED",
    ("CLOSING", RETRIES_EXHAUSTED): "CLOSED",
    ("LAST_ACK", RETRIES_EXHAUSTED): "CLOSED",
    # A peer's FIN with no proof of arrival: the state is no longer known.
    ("ESTABLISHED", LOST_TRACK): "UNKNOWN",
    ("FIN_WAIT_1", LOST_TRACK): "UNKNOWN",
    ("FIN_WAIT_2", LOST_TRACK): "UNKNOWN",
    ("SYN_RECEIVED", LOST_TRACK): "UNKNOWN",
    # An RST ends every state (Linux accepts RST in TIME_WAIT unless tcp_rfc1337=1).
    **{(s, SEND_RST): "CLOSED" for s in RESETTABLE},
    **{(s, RECV_RST): "CLOSED" for s in RESETTABLE},
}


@dataclass(slots=True)
class Endpoint:
    """One endpoint's state over time; `state` is the current one."""

    state: str = "CLOSED"
    times: list[float] = field(default_factory=list)
    states: list[str] = field(default_factory=list)

    def handle(self, event: str, ts: float) -> tuple[str, str] | None:
        """Apply one input; return (old, new) if it moved the state, None if it did not."""
        new = TRANSITIONS.get((self.state, event))
        if new is None or new == self.state:
            return None
        old, self.state = self.state, new
        self.times.append(ts)
        self.states.append(new)
        return old, new

    def start(self, state: str, ts: float) -> None:
        """Begin in `state` (a capture that starts mid-connection)."""
        self.state = state
        self.times.append(ts)
        self.states.append(state)

    def state_at(self, ts: float) -> str | None:
        """The state at instant `ts`, or None before this endpoint was first seen."""
        i = bisect.bisect_right(self.times, ts)
        return self.states[i - 1] if i else None
