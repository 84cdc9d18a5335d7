#!/usr/bin/env python3
"""Regenerate tests/malformed/: broken and hostile captures derived from the real ones in tests/data/.

Run `python3 tools/make_malformed.py` (needs zstandard). Every file is a real capture with one
defect put in by the function named after it, so a test failure points at one fault. What
pcapflow must do with each (exit status, counts) is asserted in tests/test_malformed.py.
Inputs too big to commit (many copies of one packet) are made at test time by `copies()`.

Offsets used below, in tests/data/eth_us.pcap (Ethernet, IPv4 at 14, TCP at 34):
frame 1 is the SYN, options at 54: MSS(54) SACK_PERM(58) TS(60) NOP(70) WS(71);
frame 3 is a bare ACK (TCP header 32 bytes, IP total 52); frame 4 carries the HTTP request.
In tests/data/ipv6.pcap, frame 11 is a SYN with a hop-by-hop header at 54 (TCP at 62).
"""
from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import zstandard

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
OUT = Path(__file__).resolve().parent.parent / "tests" / "malformed"
ETH_US = (DATA / "eth_us.pcap").read_bytes()
TWO_LINKS = (DATA / "two_links.pcapng").read_bytes()


def pcap_split(raw: bytes) -> tuple[bytes, list[bytearray]]:
    """A little-endian pcap as its global header and whole records (16-byte header + data)."""
    pos, out = 24, []
    while pos < len(raw):
        caplen = struct.unpack_from("<I", raw, pos + 8)[0]
        out.append(bytearray(raw[pos:pos + 16 + caplen]))
        pos += 16 + caplen
    return raw[:24], out


def pcapng_split(raw: bytes) -> list[bytearray]:
    """A little-endian pcapng as its blocks."""
    pos, out = 0, []
    while pos < len(raw):
        blen = struct.unpack_from("<I", raw, pos + 4)[0]
        out.append(bytearray(raw[pos:pos + blen]))
        pos += blen
    return out


def edit_frame(source: bytes, frame: int, edit: Callable[[bytearray], None]) -> bytes:
    """`source` with record `frame` (1-based) changed in place by `edit(data)`; lengths kept."""
    hdr, recs = pcap_split(source)
    data = recs[frame - 1][16:]
    edit(data)
    recs[frame - 1][16:] = data
    return hdr + b"".join(recs)


def setting(offset: int, value: bytes) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        data[offset:offset + len(value)] = value
    return edit


def set_caplen(source: bytes, frame: int, caplen: int, snaplen: int | None = None) -> bytes:
    """A record whose header claims `caplen` bytes (the data stays), optionally a new snaplen."""
    hdr, recs = pcap_split(source)
    struct.pack_into("<I", recs[frame - 1], 8, caplen)
    if snaplen is not None:
        hdr = hdr[:16] + struct.pack("<I", snaplen) + hdr[20:]
    return hdr + b"".join(recs)


def set_block_length(index: int, blen: int) -> bytes:
    """two_links.pcapng with block `index` (0 = section header) claiming length `blen`."""
    blocks = pcapng_split(TWO_LINKS)
    struct.pack_into("<I", blocks[index], 4, blen)
    return b"".join(blocks)


def block(btype: int, body: bytes) -> bytes:
    """One little-endian pcapng block (body padded to 32 bits)."""
    body += b"\0" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def pcapng_with(edit: Callable[[list[bytearray]], list[bytes]]) -> bytes:
    return b"".join(edit(pcapng_split(TWO_LINKS)))


def spb_for_first_packet(blocks: list[bytearray]) -> list[bytes]:
    """The first enhanced packet block replaced by a simple packet block (no timestamp)."""
    epb = blocks[3]
    caplen, wirelen = struct.unpack_from("<II", epb, 20)
    return [*blocks[:3], block(3, struct.pack("<I", wirelen) + bytes(epb[28:28 + caplen])),
            *blocks[4:]]


def far_future_first_packet(blocks: list[bytearray]) -> list[bytes]:
    """The first packet's 64-bit timestamp at 2^64 - 1 microseconds (year 586,000)."""
    struct.pack_into("<II", blocks[3], 12, 0xFFFFFFFF, 0xFFFFFFFF)
    return blocks


def corrupt(compressed: bytes, at: int) -> bytes:
    """Flip every bit of one byte of a compressed stream."""
    out = bytearray(compressed)
    out[at] ^= 0xFF
    return bytes(out)


def one_big_frame(source: bytes, frame: int, edit: Callable[[bytearray], bytearray]) -> bytes:
    """A pcap (snaplen 2^32-1) of record `frame` alone, its data replaced by `edit(data)`."""
    hdr, recs = pcap_split(source)
    data = edit(bytearray(recs[frame - 1][16:]))
    head = recs[frame - 1][:8] + struct.pack("<II", len(data), len(data))
    return hdr[:16] + struct.pack("<I", 0xFFFF_FFFF) + hdr[20:] + head + data


def hop_by_hop_chain(data: bytearray) -> bytearray:
    """ipv6.pcap frame 11 as a 16 MB jumbogram (payload length 0) of hop-by-hop headers each
    naming another: dpkt copies the rest of the packet per header, quadratic time."""
    data[18:20] = b"\0\0"
    return data[:54] + b"\x00\x00\x01\x04\x00\x00\x00\x00" * ((1 << 21) - 8)


def tso_request(data: bytearray) -> bytearray:
    """eth_us.pcap's HTTP request as a 100,000-byte TSO frame (IP total length 0)."""
    data[16:18] = b"\0\0"
    return data + b"x" * (100_000 - 29)


def rounds(n: int) -> bytes:
    """eth_us.pcap's records n times over, each round a second later (n=40: 90 kB, more
    than the reader's first 64 kB read, so a break in the stream comes after some packets)."""
    hdr, recs = pcap_split(ETH_US)
    out = []
    for k in range(n):
        for rec in recs:
            rec = bytearray(rec)
            struct.pack_into("<I", rec, 0, struct.unpack_from("<I", rec, 0)[0] + k)
            out.append(bytes(rec))
    return hdr + b"".join(out)


def copies(n: int) -> bytes:
    """eth_us.pcap's SYN record, verbatim (same timestamp) `n` times: a flood of duplicates."""
    hdr, recs = pcap_split(ETH_US)
    return hdr + bytes(recs[0]) * n


def cases() -> dict[str, bytes]:
    """File name -> content of every malformed capture."""
    hdr, recs = pcap_split(ETH_US)
    ipv6 = (DATA / "ipv6.pcap").read_bytes()
    gz, zst = gzip.compress(ETH_US, mtime=0), zstandard.ZstdCompressor().compress(ETH_US)
    long = rounds(40)
    long_gz = gzip.compress(long, mtime=0)
    long_zst = zstandard.ZstdCompressor(write_checksum=True).compress(long)
    http = b"GET /\x1b]0;xx\x07\x1b[2J HTTP/1.1\r\n\r\n"  # as long as the request (29 bytes)
    assert len(http) == 29
    return {
        # files that are no readable capture
        "empty.pcap": b"",
        "wrong_magic.pcap": b"\xde\xad\xbe\xef" + ETH_US[4:],
        "global_header_cut.pcap": ETH_US[:20],
        "pcapng_section_length_0.pcapng": set_block_length(0, 0),
        "pcapng_bad_byte_order.pcapng": TWO_LINKS[:8] + b"\x01\x02\x03\x04" + TWO_LINKS[12:],
        "gzip_header_corrupt.pcap.gz": corrupt(gz, 3),  # FLG: reserved bits set
        "gzip_corrupt_start.pcap.gz": corrupt(gz, len(gz) // 2),
        "zstd_corrupt_start.pcap.zst": corrupt(zst, 47),
        # pcap framing: cut or lying records are where the file ends, with a warning
        "record_header_cut.pcap": ETH_US[:24 + sum(map(len, recs[:5])) + 7],
        "record_data_cut.pcap": ETH_US[:24 + sum(map(len, recs[:5])) + 16 + 10],
        "caplen_over_snaplen.pcap": set_caplen(ETH_US, 6, 300_000),
        "caplen_over_2g.pcap": set_caplen(ETH_US, 6, 0x8000_0001),
        "snaplen_0.pcap": ETH_US[:16] + struct.pack("<I", 0) + ETH_US[20:],
        "snaplen_max_caplen_2g.pcap": set_caplen(ETH_US, 6, 0x7FFF_FFFF, snaplen=0xFFFF_FFFF),
        "timestamps_backwards.pcap": hdr + b"".join(reversed(recs)),
        # pcapng blocks
        "pcapng_block_length_0.pcapng": set_block_length(5, 0),
        "pcapng_block_length_odd.pcapng": set_block_length(5, 13),
        "pcapng_block_length_huge.pcapng": set_block_length(5, 0xFFFF_FFFC),
        "pcapng_unknown_block.pcapng": pcapng_with(
            lambda b: [*b[:3], block(0x0BAD, b"pcapflow"), block(0x80000BAD, b""), *b[3:]]),
        "pcapng_missing_idb.pcapng": pcapng_with(lambda b: [b[0], *b[3:]]),
        "pcapng_simple_packet_block.pcapng": pcapng_with(spb_for_first_packet),
        "pcapng_timestamp_far_future.pcapng": pcapng_with(far_future_first_packet),
        "pcapng_70000_interfaces.pcapng.gz": gzip.compress(
            pcapng_with(lambda b: [b[0], *[b[1], b[2]] * 35_000, *b[3:]]), mtime=0),
        # IPv4 and TCP headers (frame 3: bare ACK, frame 1: SYN with options)
        "ipv4_ihl_below_5.pcap": edit_frame(ETH_US, 3, setting(14, b"\x44")),
        "ipv4_ihl_past_packet.pcap": edit_frame(ETH_US, 3, setting(14, b"\x4f")),
        "tcp_offset_below_5.pcap": edit_frame(ETH_US, 3, setting(46, b"\x40")),
        "tcp_offset_past_packet.pcap": edit_frame(ETH_US, 3, setting(46, b"\xf0")),
        "tcp_option_length_0.pcap": edit_frame(ETH_US, 1, setting(55, b"\x00")),
        "tcp_option_length_1.pcap": edit_frame(ETH_US, 1, setting(55, b"\x01")),
        "tcp_option_past_header.pcap": edit_frame(ETH_US, 1, setting(61, b"\x28")),
        "tcp_option_kind_without_length.pcap": edit_frame(ETH_US, 1, setting(70, b"\x01\x01\x01\x08")),
        "tcp_sack_12_bytes.pcap": edit_frame(ETH_US, 1, setting(58, b"\x05\x0e" + bytes(range(12)) + b"\x01\x01")),
        # IPv6 extension headers (the hop-by-hop header of frame 11)
        "ipv6_ext_chain_loops.pcap": edit_frame(ipv6, 11, setting(54, b"\x00")),
        "ipv6_ext_overruns.pcap": edit_frame(ipv6, 11, setting(55, b"\xff")),
        "ipv6_ext_chain_ends_in_esp.pcap": edit_frame(ipv6, 11, setting(54, b"\x32")),
        "ipv6_ext_chain_16mb.pcap.gz": gzip.compress(one_big_frame(ipv6, 11, hop_by_hop_chain), mtime=0),
        "tso_frame_100kb.pcap.gz": gzip.compress(one_big_frame(ETH_US, 4, tso_request), mtime=0),
        # compressed streams broken after the start: read up to the break
        "gzip_corrupt_late.pcap.gz": corrupt(long_gz, len(long_gz) * 9 // 10),
        "zstd_corrupt_late.pcap.zst": corrupt(long_zst, len(long_zst) // 2),
        # packet text meant for a terminal: ESC sequences and BEL in the HTTP request line
        "terminal_escape_http.pcap": edit_frame(ETH_US, 4, setting(66, http)),
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    made = cases()
    for stale in {p.name for p in OUT.iterdir()} - set(made):
        (OUT / stale).unlink()
    for name, content in made.items():
        (OUT / name).write_bytes(content)
    print(f"{len(made)} files in {OUT}")


if __name__ == "__main__":
    main()
