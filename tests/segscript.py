"""Hand-written segment sequences for unit tests: a small builder of the segment table."""
from __future__ import annotations

import pandas as pd

from pcapflow.analysis import build
from pcapflow.capture import SEGMENT_COLUMNS, CaptureInfo
from pcapflow.teardown import Params

FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}
MOD = 1 << 32


class Script:
    """Segments of one 4-tuple written as the conversation goes; seq/ack tracked per side.

    `send(side, flags, t)` sends the next segment from 'c' or 's' with the right seq and
    ack; `seq=`/`ack=` override them (a retransmission, an RST answering an old ACK).
    """

    def __init__(self, cisn: int = 1000, sisn: int = 5000, client=("10.0.0.1", 40000),
                 server=("10.0.0.2", 80), t0: float = 1_700_000_000.0):
        self.ep = {"c": client, "s": server}
        self.nxt = {"c": cisn, "s": sisn}
        self.t0 = t0
        self.rows: list[dict] = []
        self.ipid = {"c": 100, "s": 700}

    def send(self, side: str, flags: str, t: float, plen: int = 0, seq: int | None = None,
             ack: int | None = None, ttl: int = 64, tsval: int = -1, dsack: bool = False,
             win: int = 65535, http: str | None = None, ipid: int | None = None) -> dict:
        peer = "s" if side == "c" else "c"
        bits = sum(FLAG_BITS[ch] for ch in flags)
        seq = self.nxt[side] if seq is None else seq % MOD
        if ack is None:
            ack = self.nxt[peer] if bits & 0x10 else 0
        end = (seq + plen + (1 if bits & 0x03 else 0)) % MOD
        if 0 < (end - self.nxt[side]) % MOD < (1 << 31):
            self.nxt[side] = end
        if ipid is None:
            self.ipid[side] += 1
            ipid = self.ipid[side]
        (src, sport), (dst, dport) = self.ep[side], self.ep[peer]
        row = {"capture": 0, "frame": len(self.rows) + 1, "ts": self.t0 + t, "ipver": 4,
               "src": src, "dst": dst, "sport": sport, "dport": dport, "seq": seq, "ack": ack % MOD,
               "flags": bits, "win": win, "framelen": 54 + plen, "plen": plen, "ipid": ipid, "ttl": ttl, "mss": -1,
               "wscale": -1, "sackok": False, "nsack": int(dsack), "sack": None, "dsack": dsack,
               "tsval": tsval, "tsecr": -1, "http": http}
        self.rows.append(row)
        return row

    def handshake(self, t: float = 0.0, rtt: float = 0.02, at: str = "client") -> float:
        """SYN, SYN-ACK, ACK timed as seen from `at` (client, server or middle)."""
        gaps = {"client": (rtt, 1e-5), "server": (1e-5, rtt), "middle": (rtt / 2, rtt / 2)}[at]
        self.send("c", "S", t)
        self.send("s", "SA", t + gaps[0])
        self.send("c", "A", t + gaps[0] + gaps[1])
        return t + gaps[0] + gaps[1]

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=list(SEGMENT_COLUMNS))
        return df.astype({k: v for k, v in SEGMENT_COLUMNS.items() if v != "object"})

    def analyze(self, end: float | None = None, **params):
        df = self.frame().sort_values("ts", kind="stable", ignore_index=True)
        info = CaptureInfo(path="<script>", format="script", packets=len(df), tcp_packets=len(df),
                           first_ts=float(df["ts"].min()),
                           last_ts=self.t0 + end if end is not None else float(df["ts"].max()))
        return build(df, [info], Params(**params))
