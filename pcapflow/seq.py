"""TCP flag bits and 32-bit sequence-number arithmetic (RFC 9293 3.4, RFC 1982), shared by
every layer above the reader."""

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
MOD, HALF = 1 << 32, 1 << 31


def after(a: int, b: int) -> bool:
    """a > b in sequence space."""
    return 0 < (a - b) % MOD < HALF


def at_or_after(a: int, b: int) -> bool:
    """a >= b in sequence space."""
    return (a - b) % MOD < HALF


def distance(a: int, b: int) -> int:
    """How far apart two sequence numbers are, whichever comes first."""
    d = (a - b) % MOD
    return min(d, MOD - d)
