"""The compiled fast path: pcap and pcapng framing and Ethernet/VLAN/SLL/SLL2/raw -> IPv4/IPv6
-> TCP decoding over whole buffers, with numba.

It decodes only frames whose every byte it can vouch for: one well-formed TCP segment with
its headers fully captured (IPv4 with or without options; IPv6 without extension headers;
at most one 802.1Q tag). Every other frame, and every pcapng block other than a plain
Enhanced Packet Block of a known interface, goes to the reference reader (dpkt), so both
paths give identical segment tables (tests/test_fast.py checks it on every capture we have).
"""
from __future__ import annotations

import io
import socket
from collections.abc import Callable
from io import BufferedReader
from typing import BinaryIO

import numba
import numpy as np

from . import Chunk, ReferenceChunk, _position, factorize_rows
from .decode import DECODE_BYTES, HTTP_HEAD_BYTES, HTTP_STARTS, LINK_LAYERS, SEGMENT_COLUMNS
from .files import (
    MAX_BLOCK,
    MAX_CAPLEN,
    NO_FRAME,
    SNAPLEN_FLOOR,
    CaptureInfo,
    PcapngFramer,
    Record,
    _Cut,
    check_links,
    cut_noted,
    framer_for,
    read_exact,
    read_into,
)

READ_BYTES = 8 << 20
ROWS = 1 << 16  # frames per call of the kernel (one accounting chunk)
# per-frame output fields of the kernel, one row each of an int64 matrix
FIELDS = """fallback at caplen tsraw ticks wirelen linktype ipver src_hi src_lo dst_hi dst_lo sport
dport seq ack flags win plen ipid ttl mss wscale sackok nsack dsack tsval tsecr http_at http_end
s0 s1 s2 s3 s4 s5 s6 s7""".split()
F = {name: k for k, name in enumerate(FIELDS)}
# the same indices as module constants, which numba compiles in
(
    I_FALLBACK, I_AT, I_CAPLEN, I_TSRAW, I_TICKS, I_WIRELEN, I_LINKTYPE, I_IPVER, I_SRC_HI,
    I_SRC_LO, I_DST_HI, I_DST_LO, I_SPORT, I_DPORT, I_SEQ, I_ACK, I_FLAGS, I_WIN, I_PLEN,
    I_IPID, I_TTL, I_MSS, I_WSCALE, I_SACKOK, I_NSACK, I_DSACK, I_TSVAL, I_TSECR, I_HTTP_AT,
    I_HTTP_END, I_S0, I_S1, I_S2, I_S3, I_S4, I_S5, I_S6, I_S7,
) = range(len(FIELDS))
_PREFIXES = np.zeros((len(HTTP_STARTS), 8), dtype=np.uint8)
_PREFIX_LEN = np.array([len(p) for p in HTTP_STARTS], dtype=np.int64)
for _k, _p in enumerate(HTTP_STARTS):
    _PREFIXES[_k, :len(_p)] = np.frombuffer(_p, dtype=np.uint8)
# kernel exit status
NEED_MORE, FULL, CORRUPT, PYTHON_BLOCK = 0, 1, 2, 3
EPB_TYPES = (b"\x06\x00\x00\x00", b"\x00\x00\x00\x06")  # either byte order


@numba.njit(cache=True, inline="always")
def _u16(b, i):
    return (np.int64(b[i]) << 8) | np.int64(b[i + 1])


@numba.njit(cache=True, inline="always")
def _u32(b, i):
    return (np.int64(b[i]) << 24) | (np.int64(b[i + 1]) << 16) | (np.int64(b[i + 2]) << 8) | np.int64(b[i + 3])


@numba.njit(cache=True, inline="always")
def _u32x(b, i, little):
    if little:
        return (np.int64(b[i + 3]) << 24) | (np.int64(b[i + 2]) << 16) | (np.int64(b[i + 1]) << 8) | np.int64(b[i])
    return _u32(b, i)


@numba.njit(cache=True, inline="always")
def _u64(b, i):
    return (_u32(b, i) << 32) | _u32(b, i + 4)


@numba.njit(cache=True, inline="always")
def _decode(b, s, caplen, lt, o, r, prefixes, prefix_len):
    """Decode the frame b[s:s+caplen] into o[:, r]; False when the reference must do it."""
    end = s + min(caplen, DECODE_BYTES)
    if lt == 1:
        if s + 14 > end:
            return False
        et = _u16(b, s + 12)
        p = s + 14
        if et == 0x8100:
            if p + 4 > end:
                return False
            et = _u16(b, p + 2)
            p += 4
    elif lt == 113:
        if s + 16 > end:
            return False
        et = _u16(b, s + 14)
        p = s + 16
    elif lt == 276:
        if s + 20 > end:
            return False
        et = _u16(b, s)
        p = s + 20
    elif lt == 12 or lt == 14 or lt == 101 or lt == 228 or lt == 229:
        if s >= end:
            return False
        p = s
        v = b[s] >> 4
        et = 0x0800 if v == 4 else 0x86DD if v == 6 else 0
    else:
        return False
    if et == 0x0800:
        if p + 20 > end or b[p] >> 4 != 4:
            return False
        ihl = (b[p] & 15) * 4
        total = _u16(b, p + 2)
        if ihl < 20 or p + ihl > end or total == 0 or _u16(b, p + 6) & 0x1FFF or b[p + 9] != 6:
            return False
        l4len = total - ihl
        t = p + ihl
        ipend = min(end, p + total)
        o[I_IPVER, r] = 4
        o[I_IPID, r] = _u16(b, p + 4)
        o[I_TTL, r] = b[p + 8]
        o[I_SRC_HI, r] = 0
        o[I_SRC_LO, r] = _u32(b, p + 12)
        o[I_DST_HI, r] = 0
        o[I_DST_LO, r] = _u32(b, p + 16)
    elif et == 0x86DD:
        if p + 40 > end or b[p] >> 4 != 6:
            return False
        l4len = _u16(b, p + 4)
        if l4len == 0 or b[p + 6] != 6:
            return False
        t = p + 40
        ipend = min(end, t + l4len)
        o[I_IPVER, r] = 6
        o[I_IPID, r] = -1
        o[I_TTL, r] = b[p + 7]
        o[I_SRC_HI, r] = _u64(b, p + 8)
        o[I_SRC_LO, r] = _u64(b, p + 16)
        o[I_DST_HI, r] = _u64(b, p + 24)
        o[I_DST_LO, r] = _u64(b, p + 32)
    else:
        return False
    if l4len < 20 or t + 20 > ipend:
        return False
    hlen = (b[t + 12] >> 4) * 4
    if hlen < 20 or hlen > l4len or t + hlen > ipend:
        return False
    ack = _u32(b, t + 8)
    o[I_SPORT, r] = _u16(b, t)
    o[I_DPORT, r] = _u16(b, t + 2)
    o[I_SEQ, r] = _u32(b, t + 4)
    o[I_ACK, r] = ack
    o[I_FLAGS, r] = _u16(b, t + 12) & 0x1FF
    o[I_WIN, r] = _u16(b, t + 14)
    o[I_PLEN, r] = l4len - hlen
    mss = wscale = tsval = tsecr = -1
    sackok = dsack = nsack = 0
    i = t + 20
    oend = t + hlen
    while i < oend:  # as dpkt.tcp.parse_opts: kinds 0 and 1 are one byte, others carry a length
        kind = b[i]
        if kind <= 1:
            i += 1
            continue
        if i + 1 >= oend:
            break
        step = max(2, np.int64(b[i + 1]))
        d = i + 2
        dlen = max(0, min(i + step, oend) - d)
        if kind == 8 and dlen == 8:
            tsval = _u32(b, d)
            tsecr = _u32(b, d + 4)
        elif kind == 5 and dlen >= 8:
            nsack = dlen // 8
            for k in range(8):
                o[I_S0 + k, r] = _u32(b, d + 4 * k) if k < 2 * nsack else 0
            left, right = o[I_S0, r], o[I_S1, r]
            dsack = 1 if ((ack - right) & 0xFFFFFFFF) < 0x80000000 else 0
            if not dsack and nsack > 1:
                l2, r2 = o[I_S2, r], o[I_S3, r]
                if ((left - l2) & 0xFFFFFFFF) < 0x80000000 and ((r2 - right) & 0xFFFFFFFF) < 0x80000000:
                    dsack = 1
        elif kind == 2 and dlen == 2:
            mss = _u16(b, d)
        elif kind == 3 and dlen == 1:
            wscale = np.int64(b[d])
        elif kind == 4:
            sackok = 1
        i += step
    o[I_MSS, r] = mss
    o[I_WSCALE, r] = wscale
    o[I_TSVAL, r] = tsval
    o[I_TSECR, r] = tsecr
    o[I_SACKOK, r] = sackok
    o[I_NSACK, r] = nsack
    o[I_DSACK, r] = dsack
    o[I_HTTP_AT, r] = 0
    o[I_HTTP_END, r] = 0
    ps = t + hlen
    for k in range(prefixes.shape[0]):
        n = prefix_len[k]
        if ps + n <= ipend:
            same = True
            for j in range(n):
                if b[ps + j] != prefixes[k, j]:
                    same = False
                    break
            if same:
                o[I_HTTP_AT, r] = ps
                o[I_HTTP_END, r] = min(ipend, ps + HTTP_HEAD_BYTES)
                break
    return True


@numba.njit(cache=True)
def _scan(b, pos, stop, pcapng, little, lt, ticks, snaplen, if_lt, if_ticks, if_off, o,
          prefixes, prefix_len):
    """Frame and decode records of b[pos:stop] into o; returns (frames, position, status)."""
    r = 0
    while r < o.shape[1]:
        if pcapng:
            if pos + 12 > stop:
                return r, pos, NEED_MORE
            btype = _u32x(b, pos, little)
            blen = _u32x(b, pos + 4, little)
            if btype != 6 or blen < 32 or blen % 4 or blen > MAX_BLOCK:
                return r, pos, PYTHON_BLOCK
            if pos + blen > stop:
                return r, pos, NEED_MORE
            iface = _u32x(b, pos + 8, little)
            hi = _u32x(b, pos + 12, little)
            caplen = _u32x(b, pos + 20, little)
            if (iface >= if_lt.shape[0] or if_ticks[iface] == 0 or hi >= 1 << 30
                    or blen != 32 + (caplen + 3) // 4 * 4 or _u32x(b, pos + blen - 4, little) != blen):
                return r, pos, PYTHON_BLOCK
            at = pos + 28
            link = if_lt[iface]
            o[I_TICKS, r] = if_ticks[iface]
            o[I_TSRAW, r] = if_off[iface] + ((hi << 32) | _u32x(b, pos + 16, little))
            o[I_WIRELEN, r] = _u32x(b, pos + 24, little)
            nxt = pos + blen
        else:
            if pos + 16 > stop:
                return r, pos, NEED_MORE
            caplen = _u32x(b, pos + 8, little)
            if caplen > max(snaplen, SNAPLEN_FLOOR) or caplen > MAX_CAPLEN:
                return r, pos, CORRUPT
            if pos + 16 + caplen > stop:
                return r, pos, NEED_MORE
            at = pos + 16
            link = lt
            o[I_TICKS, r] = ticks
            o[I_TSRAW, r] = _u32x(b, pos, little) * ticks + _u32x(b, pos + 4, little)
            o[I_WIRELEN, r] = _u32x(b, pos + 12, little)
            nxt = at + caplen
        o[I_AT, r] = at
        o[I_CAPLEN, r] = caplen
        o[I_LINKTYPE, r] = link
        o[I_FALLBACK, r] = 0 if _decode(b, at, caplen, link, o, r, prefixes, prefix_len) else 1
        r += 1
        pos = nxt
    return r, pos, FULL


@numba.njit(cache=True)
def _gather(b, at, end):
    """b[at[k]:end[k]] for every k, one after the other, and the offset of each in them."""
    off = np.zeros(len(at) + 1, np.int64)
    for k in range(len(at)):
        off[k + 1] = off[k] + end[k] - at[k]
    out = np.empty(off[-1], np.uint8)
    for k in range(len(at)):
        out[off[k]:off[k + 1]] = b[at[k]:end[k]]
    return out, off


class _Prefixed(io.RawIOBase):
    """buf[start:], then the rest of the stream: for handing one block back to the reference
    framer. `start` moves on as it is read; `drained` once it reads past the buffer."""

    def __init__(self, buf: memoryview, start: int, f: BinaryIO) -> None:
        self.buf, self.start, self.f, self.drained = buf, start, f, False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out = bytes(self.buf[self.start:self.start + n])
        self.start += len(out)
        if len(out) < n:
            self.drained = True
            out += read_exact(self.f, n - len(out))
        return out


class _Buffer:
    """One reused byte buffer the kernel reads from: unread bytes move to the front, new ones
    are read in behind them (no allocation per read, so the heap does not fragment).
    A cut in a compressed stream is kept until the bytes before it are used, as the
    reference reader would meet it."""

    def __init__(self, stream: BufferedReader) -> None:
        self.stream = stream
        self.data = np.empty(2 * READ_BYTES, dtype=np.uint8)
        self.start = self.end = 0
        self.eof = False
        self.cut: Exception | None = None

    def fill(self) -> None:
        """Read up to READ_BYTES more, growing the buffer when one record needs it."""
        rest = self.end - self.start
        self.data[:rest] = self.data[self.start:self.end]
        self.start, self.end = 0, rest
        if rest + READ_BYTES > len(self.data):
            self.data = np.concatenate([self.data, np.empty(len(self.data), dtype=np.uint8)])
        stop = rest + READ_BYTES
        view = memoryview(self.data)
        try:
            while self.end < stop:  # 64 KiB at a time: a broken stream loses only that part
                n = read_into(self.stream, view[self.end:min(stop, self.end + (1 << 16))])
                if not n:
                    self.eof = True
                    break
                self.end += n
        except _Cut as cut:
            self.eof, self.cut = True, cut

    def view(self) -> memoryview:
        return memoryview(self.data)[:self.end]


def read_fast(stream: BinaryIO, index: int, info: CaptureInfo, finish: Callable[[Chunk], None],
              progress: Callable[[int], None] | None) -> None:
    """Read one capture like capture._read_one, decoding in bulk where the fast path can."""
    framer = framer_for(stream, info, LINK_LAYERS)
    out = np.zeros((len(FIELDS), ROWS), dtype=np.int64)
    state = {"frame": 0, "done": 0, "heads": {}}  # heads: one str per distinct HTTP head
    ref = ReferenceChunk(index)

    def flush_ref() -> None:
        if len(ref):
            finish(ref.chunk())

    def one_record(rec) -> None:  # a frame the reference framer read
        if rec is None or rec is NO_FRAME:
            return
        if isinstance(rec, str):
            ref.skip(rec)
        else:
            state["frame"] += 1
            ref.add(state["frame"], rec)

    buf = _Buffer(stream)
    need = False
    interfaces = _Interfaces()
    with cut_noted(info, framer, ref.__len__):
        pcapng = isinstance(framer, PcapngFramer)
        if pcapng:
            one_record(framer.block(stream))  # the section header
        while True:
            if not buf.eof and (need or buf.end - buf.start < READ_BYTES // 2):
                buf.fill()
            n, buf.start, status = _scan(buf.data, buf.start, buf.end, pcapng, framer.order == "<",
                                         getattr(framer, "linktype", 0), getattr(framer, "ticks", 0),
                                         getattr(framer, "snaplen", 0), *interfaces.arrays(framer),
                                         out, _PREFIXES, _PREFIX_LEN)
            if n:
                flush_ref()
                finish(_chunk(buf.data, out[:, :n], index, state))
            if progress is not None:
                state["done"], step = _position(stream, state["done"])
                progress(step)
            need = status == NEED_MORE
            if status == FULL or (need and not buf.eof):
                continue
            if need and buf.cut is not None:  # the stream broke inside the next record
                raise buf.cut
            if buf.start == buf.end:  # the end
                break
            # blocks for the reference framer (up to the next packet block), a corrupt
            # record, or a cut at the end
            while True:
                f = _Prefixed(buf.view(), buf.start, stream)
                one_record(framer.block(f) if pcapng else framer.next(f))
                if f.drained:
                    buf.start = buf.end
                else:
                    buf.start = f.start
                head = bytes(buf.data[buf.start:min(buf.start + 4, buf.end)])
                if not pcapng or len(head) < 4 or head in EPB_TYPES:
                    break
    flush_ref()
    check_links(info, framer.links, LINK_LAYERS)


class _Interfaces:
    """The pcapng interfaces as the kernel's arrays (ticks 0: timed by the reference instead),
    rebuilt only when the framer's list changes."""

    def __init__(self) -> None:
        self.key, self.value = None, None

    def arrays(self, framer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ifs = getattr(framer, "interfaces", [])
        if self.key != getattr(framer, "version", 0):
            ok = [0 < t <= 10**9 and abs(off) * t < 1 << 62 for _, t, off in ifs]
            self.key = getattr(framer, "version", 0)
            self.value = (np.array([lt for lt, _, _ in ifs], dtype=np.int64),
                          np.array([t if good else 0 for (_, t, _), good in zip(ifs, ok)], dtype=np.int64),
                          np.array([off * t if good else 0 for (_, t, off), good in zip(ifs, ok)],
                                   dtype=np.int64))
        return self.value


def _chunk(buf: np.ndarray, o: np.ndarray, index: int, state: dict) -> Chunk:
    """The kernel's frames as a Chunk; frames it left to the reference decoded by dpkt."""
    n = o.shape[1]
    frames = state["frame"] + 1 + np.arange(n, dtype=np.int64)
    state["frame"] += n
    ts = _seconds(o[F["tsraw"]], o[F["ticks"]])
    code = np.zeros(n, dtype=np.int16)
    fallback = o[F["fallback"]].astype(bool)
    ok = ~fallback
    cols = {"capture": np.full(n, index), "frame": frames, "ts": ts, "framelen": np.minimum(
        o[F["wirelen"]], 0x7FFFFFFF)}
    for name in ("ipver", "sport", "dport", "seq", "ack", "flags", "win", "plen", "ipid", "ttl",
                 "mss", "wscale", "sackok", "nsack", "dsack", "tsval", "tsecr"):
        cols[name] = o[F[name]]
    cols["src"], cols["dst"], addresses = _addresses(
        o[F["ipver"]], *(o[F[k]] for k in ("src_hi", "src_lo", "dst_hi", "dst_lo")), ok)
    cols["sack"] = np.full(n, None, dtype=object)
    for r in np.flatnonzero(ok & (o[F["nsack"]] > 0)).tolist():
        v = o[F["s0"]:F["s0"] + 2 * o[F["nsack"], r], r].tolist()
        cols["sack"][r] = tuple(zip(v[::2], v[1::2]))
    cols["http"] = np.full(n, None, dtype=object)
    rows = np.flatnonzero(ok & (o[F["http_end"]] > 0))
    if len(rows):  # the heads copied out by the kernel, decoded at once, each text kept once
        data, off = _gather(buf, o[F["http_at"], rows], o[F["http_end"], rows])
        text, off, heads = data.tobytes().decode("latin-1"), off.tolist(), state["heads"]
        cols["http"][rows] = [heads.setdefault(h, h) for h in map(text.__getitem__, map(slice, off, off[1:]))]
    raw = memoryview(buf)
    every = not fallback.any()  # most chunks: one copy of each column, out of the kernel's buffer
    segments = {name: (cols[name] if every else cols[name][ok]).astype(dtype)
                for name, dtype in SEGMENT_COLUMNS.items()}
    # frames the kernel did not vouch for: the reference decoder, merged in frame order
    slow = np.flatnonzero(fallback)
    if len(slow):
        ref = ReferenceChunk(index)
        for r in slow.tolist():
            at, caplen = int(o[F["at"], r]), int(o[F["caplen"], r])
            ref.add(int(frames[r]), Record(float(ts[r]), int(o[F["linktype"], r]),
                                            bytes(raw[at:at + caplen]), int(o[F["wirelen"], r])))
        extra = ref.chunk()
        code[slow] = extra.code
        segments = _in_frame_order(segments, extra.segments)
        addresses = None
    return Chunk(ts, code, segments, addresses)


def _in_frame_order(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two sets of segment rows as one, in frame order."""
    order = np.argsort(np.concatenate([a["frame"], b["frame"]]), kind="stable")
    return {k: np.concatenate([a[k], b[k]])[order] for k in a}


def _seconds(raw: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """raw / ticks rounded as Python divides ints (exactly, then once to the nearest double)."""
    exact = (np.abs(raw) < 1 << 53) & (ticks < 1 << 53)
    out = raw.astype(np.float64) / ticks.astype(np.float64)  # both exact doubles: one rounding
    for r in np.flatnonzero(~exact).tolist():
        out[r] = int(raw[r]) / int(ticks[r])
    return out


def _addresses(ver: np.ndarray, src_hi: np.ndarray, src_lo: np.ndarray, dst_hi: np.ndarray,
               dst_lo: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Source and destination addresses as text (None where not ok), each distinct one
    converted once; and the rows ok's addresses as Chunk.addresses has them."""
    out, codes, texts = [], [], []
    for hi, lo in ((src_hi, src_lo), (dst_hi, dst_lo)):  # two small hash tables beat one big
        c, uniq = factorize_rows(ver[ok], hi[ok], lo[ok])
        text = np.array([_text(*row) for row in zip(*(u.tolist() for u in uniq))], dtype=object)
        out.append(np.full(len(ver), None, dtype=object))
        out[-1][ok] = text[c]
        codes.append(c + sum(map(len, texts)))
        texts.append(text)
    return out[0], out[1], (np.concatenate(codes), np.concatenate(texts))


def _text(ver: int, hi: int, lo: int) -> str:
    if ver == 4:
        return socket.inet_ntop(socket.AF_INET, lo.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, (hi & (1 << 64) - 1).to_bytes(8, "big")
                            + (lo & (1 << 64) - 1).to_bytes(8, "big"))


