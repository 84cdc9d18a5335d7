"""Every vocabulary pcapflow writes, one sentence each. Docs and tests are checked against these."""

STATES = {
    "LISTEN": "Server side before the SYN: waiting for connections.",
    "SYN_SENT": "Sent a SYN, no SYN-ACK received yet.",
    "SYN_RECEIVED": "Received a SYN and answered SYN-ACK, waiting for the handshake's ACK.",
    "ESTABLISHED": "Open in both directions.",
    "FIN_WAIT_1": "Sent its FIN (closed first), not yet acknowledged.",
    "FIN_WAIT_2": "Its FIN was acknowledged; waiting for the peer's FIN.",
    "CLOSING": "Simultaneous close: received the peer's FIN before its own FIN was acknowledged.",
    "TIME_WAIT": "Closed first and acknowledged the peer's FIN; holds the 4-tuple for 2MSL.",
    "CLOSE_WAIT": "Received the peer's FIN; its application has not closed yet.",
    "LAST_ACK": "Closed second; its FIN is not acknowledged yet.",
    "CLOSED": "No socket any more (or never one: refused).",
    "UNKNOWN": "The capture point cannot tell (e.g. a FIN seen leaving but no proof it arrived).",
}

CLOSE_TYPES = {
    "four_way": "FIN, ACK, FIN, ACK: each side's FIN acknowledged separately.",
    "three_way": "The passive side's FIN carried the ACK of the active side's FIN (FIN, FIN+ACK, ACK).",
    "simultaneous": "Both FINs were sent before either side received the other's.",
    "reset": "Ended by RST with no FIN before it.",
    "fin_then_reset": "A FIN was sent, then an RST ended the connection.",
    "refused": "The SYN was answered by RST: nobody listened.",
    "unanswered": "SYN(s) without any answer.",
    "half_closed": "One side's FIN was acknowledged; the other had not closed by capture end.",
    "closing": "Teardown under way at capture end (a FIN not yet acknowledged, or the last ACK missing).",
    "abandoned": "FIN retransmissions stopped, never acknowledged, no RST: the sender gave up.",
    "open": "No FIN or RST seen.",
}

ACTIVE_CLOSERS = {
    "client": "The client sent the first FIN (or the first RST).",
    "server": "The server sent the first FIN (or the first RST).",
    "both": "Simultaneous close.",
    "none": "Nobody closed (open, refused or unanswered).",
}

RST_KINDS = {
    "abort": "RST from a side that had sent no FIN: SO_LINGER 0, close() with unread data, application abort.",
    "reply_to_closed": "RST answering a segment for a socket already closed or gone "
                       "(FIN_WAIT_2 timeout, data after close, peer rebooted).",
    "refused": "RST answering a SYN: no listener on that port.",
    "keepalive_timeout": "RST from a side whose keepalive probes went unanswered.",
    "other": "An RST that fits none of the above (e.g. its TTL does not fit the claimed sender).",
}

VANTAGES = {
    "client": "The capture point is on (or next to) the client: its segments are seen as sent.",
    "server": "The capture point is on (or next to) the server.",
    "middle": "Between the two: segments may be lost on either side of it.",
    "both": "Both endpoints are on the capturing host (loopback).",
    "unknown": "No handshake or TTL clue to place the capture point.",
}

LOSS_POSITIONS = {
    "before_capture": "Lost between its sender and the capture point: only its retransmission was seen.",
    "after_capture": "Lost after passing the capture point: seen, then seen again.",
    "unknown": "The capture cannot place the loss.",
}

EVENT_KINDS = {
    "SYN": "A SYN (detail says if it is a retransmission).",
    "SYN_ACK": "A SYN-ACK.",
    "ESTABLISHED": "The handshake's ACK.",
    "FIN": "First transmission of a side's FIN seen.",
    "FIN_RETRANSMIT": "Another transmission of the same FIN (detail: interval since the previous one).",
    "ACK_OF_FIN": "A segment acknowledging the peer's FIN for the first time.",
    "RST": "A reset (detail: its kind).",
    "DATA_AFTER_FIN": "Payload sent by the passive side after the active side's FIN (half-close).",
    "KEEPALIVE": "A keepalive probe (seq = snd.una - 1, empty or one byte).",
    "KEEPALIVE_ACK": "The answer to a keepalive probe.",
    "TW_REACK": "A side in TIME_WAIT acknowledged a retransmitted FIN again: its 2MSL timer restarts.",
    "TW_REUSE": "A new SYN on a 4-tuple still in TIME_WAIT (detail: gap and safety check).",
    "LOSS": "A teardown segment inferred lost (detail: wave and position).",
    "STATE": "A state change with no segment of its own (a peer's segment received, a timer fired).",
}

FINDING_KINDS = {
    "server_time_wait_pileup": "A server port closes first on many connections and holds their TIME_WAITs.",
    "close_wait_leak": "Connections whose application never closed after the peer's FIN.",
    "port_exhaustion_risk": "A client's TIME_WAITs and open connections toward one server ip:port "
                            "approach its ephemeral port range.",
    "fin_loss": "FINs or their ACKs were lost (by wave).",
    "orphan_giveup": "A closed socket retransmitted its FIN until tcp_orphan_retries ran out.",
    "rst_shortcut": "Connections ended by RST instead of a FIN exchange (by kind).",
    "tw_reuse_unsafe": "A 4-tuple was reused inside TIME_WAIT without a higher ISN or newer timestamp.",
    "fin_wait2_timeout": "An orphaned FIN_WAIT_2 expired; the peer's late segment got an RST.",
    "keepalive_dead_peer": "Keepalive probes went unanswered and the prober reset the connection.",
}

# Why a packet read is not a TCP segment of the analysis: packets = tcp_packets + sum(skipped).
SKIP_REASONS = {
    "non_ip": "a link-layer frame carrying no IP (ARP, LLDP, ...)",
    "non_tcp": "an IP datagram of another protocol (UDP, ICMP, ESP, ...)",
    "fragment": "an IP fragment after the first (the TCP header is in the first)",
    "truncated": "captured bytes end inside the TCP header (small snap length)",
    "malformed": "IP or TCP header contradicting itself or the lengths around it "
                 "(IHL < 5, data offset < 5 or past the datagram, extension chain overrun)",
    "unsupported_link": "a frame of a link type pcapflow does not decode",
    "no_interface": "a pcapng packet of an interface never described (no IDB for it)",
    "bad_timestamp": "no timestamp (pcapng simple packet block) or one outside 1677-2262",
    "segment_cap": "a TCP segment past the segment cap (capture/limits.py)",
    "connection_cap": "a TCP segment of a 4-tuple past the connection cap (capture/limits.py)",
    "filtered": "left out by --filter",
}

SEVERITIES = ("info", "warning", "critical")
