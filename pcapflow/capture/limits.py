"""Caps on what one analysis keeps in memory, so a huge or hostile capture degrades, not dies.

Past a cap the reader goes on counting packets (accounting still adds up: they are skipped
with the cap's reason) but keeps no more segments, and says so once per file (a warning on
the "pcapflow" logger). The whole analysis peaks at about 0.7 kB per segment kept and 10 kB
per connection (measured: 2 million segments of one connection 1.4 GB, 200,000 one-packet
connections 2.2 GB), so each default cap alone stays under about 3.5 GB.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .files import CaptureError

# skip reason -> what the warning says happened; {n} is the cap, {env} its variable
CAP_REASONS = {
    "segment_cap": "kept the first {n:,} TCP segments ({env}); later ones are counted as "
                   "skipped (segment_cap), not analyzed",
    "connection_cap": "tracked the first {n:,} 4-tuples ({env}); segments of later ones are "
                      "counted as skipped (connection_cap), not analyzed",
}
UNBOUNDED = 1 << 62
ENV = {"segment_cap": "PCAPFLOW_MAX_SEGMENTS", "connection_cap": "PCAPFLOW_MAX_CONNECTIONS"}


@dataclass(frozen=True, slots=True)
class Limits:
    """How many TCP segments and distinct 4-tuples one read keeps (over all its files)."""

    max_segments: int = 5_000_000
    max_connections: int = 250_000

    @classmethod
    def from_env(cls) -> Limits:
        """The defaults, overridden by PCAPFLOW_MAX_SEGMENTS / PCAPFLOW_MAX_CONNECTIONS."""
        d = cls()
        return cls(max_segments=_env_int(ENV["segment_cap"], d.max_segments),
                   max_connections=_env_int(ENV["connection_cap"], d.max_connections))

    @classmethod
    def unbounded(cls) -> Limits:
        """No caps: for readers that do not keep what they read (batch's map)."""
        return cls(max_segments=UNBOUNDED, max_connections=UNBOUNDED)

    def message(self, reason: str) -> str:
        n = self.max_segments if reason == "segment_cap" else self.max_connections
        return CAP_REASONS[reason].format(n=n, env=ENV[reason])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip().replace("_", "")
    if not value:
        return default
    if not value.isdigit():
        raise CaptureError(f"{name}={value!r}: expected a whole number")
    return int(value)
