"""Capture files: open (stdin, compression), recognise pcap/pcapng, iterate link-layer records.

The byte-level edge of pcapflow. File and block headers are dpkt's declarative classes;
this module only walks them and reports, without raising, where a file was cut short.
"""
from __future__ import annotations

import bz2
import io
import lzma
import os
import struct
import sys
import zlib
from collections.abc import Callable, Container, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from io import BufferedReader
from typing import BinaryIO

import dpkt
from dpkt import pcap, pcapng

try:
    from zstandard import ZstdError
except ImportError:  # zstd input is then refused by _open_zstd before any read
    ZstdError = OSError
try:  # Intel's ISA-L inflates gzip ~5x faster than zlib (1 GB: 0.34 s, not 1.71 s): pcapflow[fast]
    from isal.igzip import IGzipFile as GzipFile
    from isal.isal_zlib import error as IsalError
except ImportError:
    from gzip import GzipFile
    IsalError = zlib.error


class CaptureError(Exception):
    """A user-caused problem with an input: the message names the file and the reason."""


# magic -> (byte order, timestamp ticks per second)
PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 10**6), b"\xa1\xb2\xc3\xd4": (">", 10**6),
    b"\x4d\x3c\xb2\xa1": ("<", 10**9), b"\xa1\xb2\x3c\x4d": (">", 10**9),
}
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
MAX_INTERFACES = 1 << 16  # per pcapng section: more is a corrupt or hostile file, not a capture
COMPRESSION_MAGICS = {
    b"\x1f\x8b": ("gzip", lambda f: GzipFile(fileobj=f)),
    b"BZh": ("bz2", bz2.BZ2File),
    b"\xfd7zXZ\x00": ("xz", lzma.LZMAFile),
    b"\x28\xb5\x2f\xfd": ("zstd", None),
}


@dataclass(slots=True)
class Record:
    """One captured frame: when, on which link type, its bytes and its length on the wire."""

    ts: float
    linktype: int
    data: bytes
    wirelen: int


@dataclass
class CaptureInfo:
    """What one input held, and what was skipped and why (counts add up to `packets`)."""

    path: str
    format: str = ""
    compression: str | None = None
    linktype: list[str] = field(default_factory=list)
    packets: int = 0
    tcp_packets: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_ts: float | None = None
    last_ts: float | None = None
    truncated: str | None = None  # where the file was cut short, if it was

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _open_zstd(raw: BinaryIO, path: str) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise CaptureError(f"{path}: zstd-compressed; install pcapflow[zstd] to read it") from None
    return zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)


class _Borrowed(io.RawIOBase):
    """A caller's binary file (or stdin) read through our buffers; closing these leaves it open."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


@contextmanager
def open_capture(path: str | os.PathLike | BinaryIO) -> Iterator[tuple[BinaryIO, str, str | None]]:
    """Open a path, '-' (stdin) or a binary file; undo compression recognised by magic bytes.

    Yields (stream, display name, compression or None); closes only what it opened. The
    stream's `raw_position()` tells how far into the (compressed) input reading has come.
    """
    with ExitStack() as opened:
        if hasattr(path, "read"):
            raw = io.BufferedReader(_Borrowed(path))
            name = str(getattr(path, "name", "<stream>"))
        elif str(path) == "-":
            raw, name = io.BufferedReader(_Borrowed(sys.stdin.buffer)), "<stdin>"
        else:
            name = str(path)
            if os.path.isdir(name):
                raise CaptureError(f"{name}: is a directory, not a capture file")
            try:
                raw = open(name, "rb")  # noqa: SIM115 (closed by the ExitStack)
            except FileNotFoundError:
                raise CaptureError(f"{name}: no such file") from None
            except OSError as e:
                raise CaptureError(f"{name}: cannot open ({e.strerror})") from None
        opened.enter_context(raw)
        head = raw.peek(6)[:6]
        for magic, (kind, opener) in COMPRESSION_MAGICS.items():
            if head.startswith(magic):
                inner = _open_zstd(raw, name) if opener is None else opener(raw)
                stream = opened.enter_context(io.BufferedReader(inner, 1 << 16))
                stream.raw_position = raw.tell
                yield stream, name, kind
                return
        raw.raw_position = raw.tell
        yield raw, name, None


_BROKEN = (EOFError, OSError, lzma.LZMAError, zlib.error, ValueError, ZstdError, IsalError)


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Read n bytes, fewer only at the end of the stream (or where decompression failed)."""
    try:
        return f.read(n)
    except _BROKEN as e:
        raise _Cut(f"compressed stream broken ({e})") from None


def read_into(f: BufferedReader, view: memoryview) -> int:
    """Fill some of `view` with at most one read below the buffer; 0 at the end."""
    try:
        return f.readinto1(view)
    except _BROKEN as e:
        raise _Cut(f"compressed stream broken ({e})") from None


class _Cut(Exception):
    """The stream ended or broke inside a record."""


def framer_for(f: BinaryIO, info: CaptureInfo, supported: Container[int]) -> PcapFramer | PcapngFramer:
    """Recognise the format by its first bytes and read the file header."""
    try:
        head = read_exact(f, 4)
    except _Cut as cut:
        raise CaptureError(f"{info.path}: {cut}") from None
    if head in PCAP_MAGICS:
        info.format = "pcap"
        return PcapFramer(f, head, info, supported)
    if head == PCAPNG_MAGIC:
        info.format = "pcapng"
        return PcapngFramer(head, info)
    if not head:
        raise CaptureError(f"{info.path}: empty file")
    raise CaptureError(f"{info.path}: not a pcap or pcapng file (starts with {head.hex()})")


@contextmanager
def cut_noted(info: CaptureInfo, framer, pending: Callable[[], int]) -> Iterator[None]:
    """Turn a cut inside the stream into `info.truncated` (an error if nothing was readable);
    `pending()` tells how many frames were read but not yet counted in `info.packets`."""
    try:
        yield
    except _Cut as cut:
        if not framer.links:  # nothing readable at all, like a cut pcap global header
            raise CaptureError(f"{info.path}: cut short before any interface was described ({cut})") from None
        info.truncated = f"{cut} after packet {info.packets + pending()}"


def check_links(info: CaptureInfo, links: list[int], supported: Container[int]) -> None:
    """A file none of whose link types we decode is an input error, not a file of skipped frames."""
    if links and not any(lt in supported for lt in links):
        names = ", ".join(f"{linktype_name(lt)} ({lt})" for lt in dict.fromkeys(links))
        plural = "s" if len(set(links)) > 1 else ""
        raise CaptureError(f"{info.path}: unsupported link type{plural} {names}")


MAX_CAPLEN = 1 << 24
SNAPLEN_FLOOR = 262144  # a record up to this long is fine whatever the header's snaplen says


class PcapFramer:
    """pcap: one global header, then (16-byte header, frame) records."""

    def __init__(self, f: BinaryIO, magic: bytes, info: CaptureInfo, supported: Container[int]):
        self.order, self.ticks = PCAP_MAGICS[magic]
        rest = read_exact(f, 20)
        if len(rest) < 20:
            raise CaptureError(f"{info.path}: pcap global header cut short ({4 + len(rest)} of 24 bytes)")
        hdr = (pcap.LEFileHdr if self.order == "<" else pcap.FileHdr)(magic + rest)
        self.linktype = hdr.linktype & 0xFFFF  # upper bits: FCS length and flags (RFC draft pcap 4)
        self.snaplen = hdr.snaplen
        self.links: list[int] = []
        _new_link(info, self.links, self.linktype)
        check_links(info, self.links, supported)
        self.rec = struct.Struct(self.order + "IIII")

    def corrupt(self, caplen: int) -> _Cut | None:
        if caplen > max(self.snaplen, SNAPLEN_FLOOR) or caplen > MAX_CAPLEN:
            return _Cut(f"record length {caplen} beyond snaplen {self.snaplen}: corrupt record")
        return None

    def next(self, f: BinaryIO) -> Record | None:
        h = read_exact(f, 16)
        if not h:
            return None
        if len(h) < 16:
            raise _Cut(f"record header cut short ({len(h)} of 16 bytes)")
        sec, frac, caplen, wirelen = self.rec.unpack(h)
        if (cut := self.corrupt(caplen)) is not None:
            raise cut
        data = read_exact(f, caplen)
        if len(data) < caplen:
            raise _Cut(f"record cut short ({len(data)} of {caplen} bytes)")
        return Record((sec * self.ticks + frac) / self.ticks, self.linktype, data, wirelen)


class PcapngFramer:
    """pcapng: blocks; every section may redefine byte order and interfaces."""

    def __init__(self, magic: bytes, info: CaptureInfo):
        self.info = info
        self.interfaces: list[tuple[int, int, int]] = []  # (linktype, ticks per second, offset)
        self.version = 0  # changes with the interfaces
        self.order = "<"
        self.head: bytes | None = magic  # the first block's type, already read
        self.links: list[int] = []

    def next(self, f: BinaryIO) -> Record | str | None:
        """The next frame (or a skip reason), None at the end."""
        while (out := self.block(f)) is not None:
            if out is not NO_FRAME:
                return out
        return None

    def block(self, f: BinaryIO):
        """Read one block: a Record, a skip reason, NO_FRAME (no packet in it) or None at the end."""
        head, self.head = self.head, None
        if head is None:
            head = read_exact(f, 4)
            if not head:
                return None
        rest = read_exact(f, 8)
        if len(head) + len(rest) < 12:
            raise _Cut("block header cut short")
        if head == PCAPNG_MAGIC:
            self.order = "<" if rest[4:8] == b"\x4d\x3c\x2b\x1a" else ">"
            if rest[4:8] not in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d"):
                raise CaptureError(f"{self.info.path}: pcapng section header with unknown byte order")
            self.interfaces = []
            self.version += 1
        order = self.order
        (btype,) = struct.unpack(order + "I", head)
        (blen,) = struct.unpack(order + "I", rest[:4])
        if blen < 12 or blen % 4 or blen > MAX_BLOCK:
            raise _Cut(f"pcapng block of impossible length {blen}")
        body = read_exact(f, blen - 12)
        if len(body) < blen - 12:
            raise _Cut(f"pcapng block cut short ({len(body) + 12} of {blen} bytes)")
        buf = head + rest + body
        le = order == "<"
        try:
            if btype == pcapng.PCAPNG_BT_IDB:
                if len(self.interfaces) == MAX_INTERFACES:
                    raise _Cut(f"more than {MAX_INTERFACES:,} interfaces in one section")
                self.interfaces.append(_interface(pcapng.InterfaceDescriptionBlockLE(buf) if le
                                                  else pcapng.InterfaceDescriptionBlock(buf), order))
                self.version += 1
                _new_link(self.info, self.links, self.interfaces[-1][0])
            elif btype in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
                if btype == pcapng.PCAPNG_BT_EPB:
                    b = pcapng.EnhancedPacketBlockLE(buf) if le else pcapng.EnhancedPacketBlock(buf)
                else:
                    b = pcapng.PacketBlockLE(buf) if le else pcapng.PacketBlock(buf)
                if b.iface_id >= len(self.interfaces):
                    return "no_interface"
                lt, ticks, off = self.interfaces[b.iface_id]
                ts = (off * ticks + ((b.ts_high << 32) | b.ts_low)) / ticks
                return Record(ts, lt, bytes(b.pkt_data), b.pkt_len)
            elif btype == pcapng.PCAPNG_BT_SPB:
                if not self.interfaces:
                    return "no_interface"
                (wirelen,) = struct.unpack(order + "I", buf[8:12])
                return Record(float("nan"), self.interfaces[0][0], buf[12:12 + min(wirelen, blen - 16)], wirelen)
        except (dpkt.UnpackError, ValueError, struct.error, IndexError):
            raise _Cut(f"corrupt pcapng block type {btype:#x}") from None
        return NO_FRAME


NO_FRAME = object()  # what PcapngFramer.block returns for a block that carries no packet
MAX_BLOCK = 1 << 26


def _new_link(info: CaptureInfo, links: list[int], linktype: int) -> None:
    """Note a link type once, however many interfaces have it."""
    if linktype not in links:
        links.append(linktype)
        info.linktype.append(linktype_name(linktype))


def _interface(idb, order: str) -> tuple[int, int, int]:
    """Link type, timestamp ticks per second and offset of one pcapng interface (if_tsresol,
    if_tsoffset)."""
    ticks, offset = 10**6, 0
    for opt in idb.opts:
        if opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
            v = opt.data[0]
            ticks = 2 ** (v & 0x7F) if v & 0x80 else 10 ** (v & 0x7F)
        elif opt.code == pcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) >= 8:
            offset = struct.unpack(order + "q", opt.data[:8])[0]
    return idb.linktype, ticks, offset


LINKTYPE_NAMES = {0: "NULL", 1: "EN10MB", 9: "PPP", 12: "RAW", 14: "RAW", 50: "PPP_HDLC",
                  101: "RAW", 105: "IEEE802_11", 108: "LOOP", 113: "LINUX_SLL",
                  127: "IEEE802_11_RADIOTAP", 220: "USB_LINUX_MMAPPED", 228: "IPV4", 229: "IPV6",
                  239: "NFLOG", 253: "NETLINK", 276: "LINUX_SLL2"}


def linktype_name(lt: int) -> str:
    return LINKTYPE_NAMES.get(lt, f"LINKTYPE_{lt}")
