"""Fixed forwarding delay for the lab router, through NFQUEUE (this kernel has no netem).

    ip netns exec pf-r python3 tools/lab_delay.py QUEUE_NUM DELAY_MS

Every packet the router's forward hook queues (iptables ``-j NFQUEUE``) is held for
DELAY_MS and then accepted, in arrival order: a constant one-way delay per router hop.
Speaks nfnetlink_queue directly (linux/netfilter/nfnetlink_queue.h), metadata only.
Prints "ready" once bound.
"""

from __future__ import annotations

import collections
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(msg_type: int, queue: int, attrs: bytes) -> bytes:
    body = struct.pack("BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return (
        struct.pack(
            "IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, NLM_F_REQUEST, 0, 0
        )
        + body
    )


def packet_ids(data: bytes) -> list[int]:
    """Packet ids of the NFQNL_MSG_PACKET messages in one netlink datagram."""
    ids, off = [], 0
    while off + 16 <= len(data):
        length, msg_type = struct.unpack_from("IH", data, off)
        if msg_type == NLMSG_ERROR:
            errno = -struct.unpack_from("i", data, off + 16)[0]
            if errno:
                raise OSError(errno, "nfnetlink_queue error")
        elif msg_type & 0xFF == NFQNL_MSG_PACKET:
            a = off + 20
            while a < off + length:
                alen, akind = struct.unpack_from("HH", data, a)
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, a + 4)[0])
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids


def main() -> None:
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    sock.send(
        message(
            NFQNL_MSG_CONFIG,
            queue,
            attr(NFQA_CFG_CMD, struct.pack("BBH", NFQNL_CFG_CMD_BIND, 0, 0)),
        )
    )
    sock.send(
        message(
            NFQNL_MSG_CONFIG, queue, attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
        )
    )
    print("ready", flush=True)
    held: collections.deque[tuple[float, int]] = collections.deque()
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, pid = held.popleft()
            sock.send(
                message(
                    NFQNL_MSG_VERDICT,
                    queue,
                    attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid)),
                )
            )
        sock.settimeout(max(held[0][0] - now, 0) if held else None)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        due = time.monotonic() + delay
        held.extend((due, pid) for pid in packet_ids(data))


if __name__ == "__main__":
    main()
