"""The tcpdump filter subset users type most, applied to the segment table.

Grammar: primitives `host A`, `net CIDR`, `port N`, `portrange N-M`, each optionally
preceded by `src` or `dst`, and `tcp`/`ip`/`ip6`; combined with `and`/`&&`, `or`/`||`,
`not`/`!` and parentheses, as in pcap-filter(7).
"""
from __future__ import annotations

import ipaddress
import re

import numpy as np

TOKEN = re.compile(r"\s*(\(|\)|&&|\|\||!|[^\s()!&|]+)")


class FilterError(ValueError):
    """The filter expression cannot be understood; the message says where."""


def parse(expr: str):
    tokens = TOKEN.findall(expr)
    if "".join(tokens).replace(" ", "") != expr.replace(" ", ""):
        raise FilterError(f"cannot read filter {expr!r}")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        if pos >= len(tokens):
            raise FilterError(f"filter {expr!r} ends too early")
        pos += 1
        return tokens[pos - 1]

    def disjunction():
        left = conjunction()
        while peek() in ("or", "||"):
            take()
            left = _either(left, conjunction())
        return left

    def conjunction():
        left = negation()
        while peek() in ("and", "&&"):
            take()
            left = _both(left, negation())
        return left

    def negation():
        if peek() in ("not", "!"):
            take()
            inner = negation()
            return lambda s: ~inner(s)
        if peek() == "(":
            take()
            inner = disjunction()
            if take() != ")":
                raise FilterError(f"missing ')' in filter {expr!r}")
            return inner
        return primitive()

    def primitive():
        word = take()
        if word in ("tcp", "ip", "ip6"):
            ver = {"tcp": 0, "ip": 4, "ip6": 6}[word]
            return lambda s: np.ones(len(s), bool) if ver == 0 else (s["ipver"] == ver).to_numpy()
        direction = None
        if word in ("src", "dst"):
            direction, word = word, take()
        value = take()
        cols = {"src": ("src",), "dst": ("dst",), None: ("src", "dst")}[direction]
        pcols = {"src": ("sport",), "dst": ("dport",), None: ("sport", "dport")}[direction]
        if word == "host":
            try:
                addr = str(ipaddress.ip_address(value))
            except ValueError:
                raise FilterError(f"not an IP address in filter: {value!r}") from None
            return lambda s: np.logical_or.reduce([(s[c] == addr).to_numpy() for c in cols])
        if word == "net":
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise FilterError(f"not a network in filter: {value!r}") from None
            return lambda s: np.logical_or.reduce(
                [s[c].map(lambda a: ipaddress.ip_address(a) in net).to_numpy(bool) for c in cols])
        if word in ("port", "portrange"):
            try:
                lo, _, hi = value.partition("-")
                lo, hi = int(lo), int(hi or lo)
            except ValueError:
                raise FilterError(f"not a port in filter: {value!r}") from None
            return lambda s: np.logical_or.reduce(
                [s[c].between(lo, hi).to_numpy() for c in pcols])
        raise FilterError(f"unsupported filter primitive {word!r} (host, net, port, portrange, "
                          "src/dst, tcp, ip, ip6, and/or/not)")

    result = disjunction()
    if pos != len(tokens):
        raise FilterError(f"unexpected {tokens[pos]!r} in filter {expr!r}")
    return result


def _either(a, b):
    return lambda s: a(s) | b(s)


def _both(a, b):
    return lambda s: a(s) & b(s)
