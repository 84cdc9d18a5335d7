"""Where the capture point sits, and so which endpoint's received segments it can vouch for.

Clues: the handshake's two gaps (at the client, SYN -> SYN-ACK is a round trip and the
ACK follows at once; at the server the reverse; in the middle both gaps are partial
round trips) and TTLs (a segment seen on its sender's own host still has an initial TTL).
"""
from __future__ import annotations

import functools
import ipaddress

INITIAL_TTLS = {32, 64, 128, 255}
RATIO = 0.25  # one gap under a quarter of the other puts the capture point at an end


def from_handshake(syn_ts: float | None, synack_ts: float | None, ack_ts: float | None) -> str | None:
    """client / server / middle from the handshake's timing, or None without a full handshake."""
    if syn_ts is None or synack_ts is None or ack_ts is None:
        return None
    g1, g2 = synack_ts - syn_ts, ack_ts - synack_ts
    if g1 < 0 or g2 < 0 or g1 + g2 < 200e-6:
        return None  # too fast to tell (same host or same switch)
    if g2 < RATIO * g1:
        return "client"
    if g1 < RATIO * g2:
        return "server"
    return "middle"


def from_ttls(client_ttl: int | None, server_ttl: int | None) -> str | None:
    """A side whose segments still carry an initial TTL was captured on its own host."""
    if client_ttl is None or server_ttl is None:
        return None
    c, s = client_ttl in INITIAL_TTLS, server_ttl in INITIAL_TTLS
    if c and not s:
        return "client"
    if s and not c:
        return "server"
    if not c and not s:
        return "middle"
    return None


@functools.lru_cache(maxsize=4096)  # asked once per connection, of few distinct pairs
def is_loopback(client_ip: str, server_ip: str) -> bool:
    return client_ip == server_ip or ipaddress.ip_address(client_ip).is_loopback


def by_votes(client_votes: int, server_votes: int) -> str:
    """An undecided connection's vantage: the side whose host more other connections placed
    the capture point on."""
    return "client" if client_votes > server_votes else "server" if server_votes > client_votes else "unknown"


def local_sides(vantage: str) -> frozenset[int]:
    """Sides (0 client, 1 server) whose received segments the capture point sees arrive."""
    return {"client": frozenset({0}), "server": frozenset({1}),
            "both": frozenset({0, 1})}.get(vantage, frozenset())
