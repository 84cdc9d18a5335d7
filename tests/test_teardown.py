"""Teardown reconstruction on hand-written segment sequences, one phenomenon per test."""
import pytest
from segscript import Script


def row(a, conn_id=0):
    return a.connections.loc[conn_id]


def kinds(a, conn_id=0):
    ev = a.events[a.events["conn_id"] == conn_id]
    return list(zip(ev["side"], ev["kind"]))


def four_way(s, t, first="c"):
    other = "s" if first == "c" else "c"
    s.send(first, "FA", t)
    s.send(other, "A", t + 0.02)
    s.send(other, "FA", t + 0.03)
    s.send(first, "A", t + 0.05)


def test_four_way_client_first_seen_at_client():
    s = Script()
    s.handshake(at="client")
    s.send("c", "PA", 0.1, plen=100)
    s.send("s", "A", 0.12)
    four_way(s, 1.0)
    r = row(s.analyze(end=5))
    assert (r.vantage, r.close_type, r.active_closer) == ("client", "four_way", "client")
    assert (r.client_state_end, r.server_state_end) == ("TIME_WAIT", "CLOSED")
    assert r.time_wait_side == "client"
    assert r.time_wait_end == pytest.approx(r.first_ts + 1.05 + 60)
    assert r.lost_waves == [] and r.client_fin_retransmits == 0
    assert (r.client_bytes, r.server_bytes, r.packets) == (100, 0, 9)


def test_time_wait_expires_after_2msl_and_msl_is_a_parameter():
    s = Script()
    s.handshake()
    four_way(s, 1.0)
    assert row(s.analyze(end=70)).client_state_end == "CLOSED"
    assert row(s.analyze(end=70, msl=60)).client_state_end == "TIME_WAIT"


def test_server_first_close_puts_time_wait_on_the_server():
    s = Script()
    s.handshake(at="server")
    four_way(s, 1.0, first="s")
    r = row(s.analyze())
    assert (r.vantage, r.active_closer, r.time_wait_side) == ("server", "server", "server")
    assert (r.client_state_end, r.server_state_end) == ("CLOSED", "TIME_WAIT")


def test_three_wave_close_fin_carries_the_ack():
    s = Script()
    s.handshake()
    s.send("c", "FA", 1.0)
    s.send("s", "FA", 1.02)
    s.send("c", "A", 1.021)
    r = row(s.analyze())
    assert r.close_type == "three_way"
    assert (r.client_state_end, r.server_state_end) == ("TIME_WAIT", "CLOSED")


def test_simultaneous_close_both_sides_pass_closing_to_time_wait():
    s = Script()
    s.handshake(at="middle")
    cfin = s.nxt["c"]
    s.send("c", "FA", 1.0)
    s.send("s", "FA", 1.0005, ack=cfin)  # sent before the client's FIN arrived
    s.send("c", "A", 1.01)
    s.send("s", "A", 1.0105)
    a = s.analyze()
    r = row(a)
    assert (r.close_type, r.active_closer, r.time_wait_side) == ("simultaneous", "both", "both")
    assert (r.client_state_end, r.server_state_end) == ("TIME_WAIT", "TIME_WAIT")
    c_ep, s_ep = a.endpoint(0)
    assert "CLOSING" in c_ep.states and "CLOSING" in s_ep.states


def test_lost_first_wave_seen_twice_at_the_client():
    s = Script()
    s.handshake()
    fin = s.nxt["c"]
    s.send("c", "FA", 1.0)
    s.send("c", "FA", 1.21, seq=fin)
    s.send("s", "A", 1.23)
    s.send("s", "FA", 1.24)
    s.send("c", "A", 1.25)
    r = row(s.analyze())
    assert r.client_fin_retransmits == 1 and r.client_fin_backoff == [pytest.approx(0.21)]
    assert r.lost_waves == [1]
    assert r.losses == [{"wave": 1, "count": 1, "position": "after_capture"}]
    assert r.close_type == "four_way"


def test_lost_second_wave_proved_by_dsack():
    s = Script()
    s.handshake()
    fin = s.nxt["c"]
    s.send("c", "FA", 1.0)
    s.send("c", "FA", 1.21, seq=fin)
    s.send("s", "A", 1.23, dsack=True)  # the server had the FIN: its first ACK was lost
    four_tail = s.send("s", "FA", 1.3)
    s.send("c", "A", 1.32)
    r = row(s.analyze())
    assert four_tail["flags"] == 0x11
    assert r.losses == [{"wave": 2, "count": 1, "position": "before_capture"}]


def test_ack_seen_then_fin_retransmitted_means_the_ack_was_lost_after_the_capture_point():
    s = Script()
    s.handshake(at="middle")
    fin = s.nxt["c"]
    s.send("c", "FA", 1.0)
    s.send("s", "A", 1.02)
    s.send("c", "FA", 1.21, seq=fin)
    s.send("s", "A", 1.23, dsack=True)
    r = row(s.analyze())
    assert r.losses == [{"wave": 2, "count": 1, "position": "after_capture"}]
    assert (r.client_state_end, r.server_state_end) == ("FIN_WAIT_2", "CLOSE_WAIT")
    assert r.close_type == "half_closed"


def test_lost_fourth_wave_restarts_time_wait():
    s = Script()
    s.handshake()
    four_way(s, 1.0)
    sfin = (s.nxt["s"] - 1)
    s.send("s", "FA", 1.25, seq=sfin)
    s.send("c", "A", 1.27)
    a = s.analyze()
    r = row(a)
    assert r.lost_waves == [4] and r.server_fin_retransmits == 1
    assert r.time_wait_restarts == 1
    assert r.time_wait_end == pytest.approx(r.first_ts + 1.27 + 60)
    assert ("client", "TW_REACK") in kinds(a)


def test_orphan_gives_up_after_backoff_and_retries_are_estimated():
    s = Script()
    s.handshake()
    fin = s.nxt["c"]
    for t in (1.0, 1.21, 1.42, 1.84, 2.67, 4.33):  # TLP, then RTOs doubling
        s.send("c", "FA", t, seq=fin)
    a = s.analyze(end=20)
    r = row(a)
    assert r.close_type == "abandoned"
    assert r.orphan_retries_estimate == 4  # budget 0.2 * (2^5 - 1) = 6.2 s: after 3.33, before 6.65
    assert bool(r.fin_backoff_exponential) is True
    assert r.fin_rto_estimate == pytest.approx(0.21)
    assert (r.client_state_end, r.server_state_end) == ("CLOSED", "UNKNOWN")
    giveup = a.events[a.events["detail"].str.contains("never acknowledged")]
    assert giveup["ts"].iloc[0] == pytest.approx(r.first_ts + 4.33 + 2 * 1.66)


def test_unfinished_fin_series_is_still_closing():
    s = Script()
    s.handshake()
    fin = s.nxt["c"]
    for t in (1.0, 1.21, 1.42):
        s.send("c", "FA", t, seq=fin)
    r = row(s.analyze(end=1.5))
    assert r.close_type == "closing" and r.client_state_end == "FIN_WAIT_1"


def test_sequence_numbers_wrap_around():
    s = Script(cisn=(1 << 32) - 50, sisn=(1 << 32) - 1)
    s.handshake()
    s.send("c", "PA", 0.1, plen=100)
    s.send("s", "A", 0.12)
    four_way(s, 1.0)
    r = row(s.analyze())
    assert (r.close_type, r.client_state_end, r.server_state_end) == ("four_way", "TIME_WAIT", "CLOSED")
    assert r.client_bytes == 100


def test_duplicated_packets_are_counted_and_ignored():
    plain, doubled = Script(), Script()
    for s in (plain, doubled):
        s.handshake()
        four_way(s, 1.0)
    for r in list(doubled.rows):
        doubled.rows.append({**r, "ts": r["ts"] + 1e-5, "ttl": r["ttl"] - 1})
    a, b = row(plain.analyze()), row(doubled.analyze())
    assert b.duplicates == 7 and a.duplicates == 0
    for col in ("close_type", "client_state_end", "server_state_end", "lost_waves", "packets"):
        assert a[col] == b[col], col


def test_fin_carrying_data():
    s = Script()
    s.handshake()
    s.send("c", "FPA", 1.0, plen=50)
    s.send("s", "A", 1.02)
    s.send("s", "FA", 1.03)
    s.send("c", "A", 1.05)
    a = s.analyze()
    r = row(a)
    assert r.close_type == "four_way" and r.client_bytes == 50
    assert a.events.query("kind == 'FIN'")["detail"].iloc[0] == "with data"


def test_rst_with_ack_from_a_side_without_fin_is_an_abort():
    s = Script()
    s.handshake()
    s.send("s", "PA", 0.5, plen=10)
    s.send("c", "RA", 0.6)
    r = row(s.analyze())
    assert (r.close_type, r.rst_by, r.rst_kind, r.active_closer) == ("reset", "client", "abort", "none")
    assert (r.client_state_end, r.server_state_end) == ("CLOSED", "CLOSED")


def test_bare_rst_after_fin_wait2_timeout():
    s = Script()
    s.handshake()
    s.send("c", "FA", 1.0)
    s.send("s", "A", 1.02)
    s.send("s", "FA", 70.0)                   # the server closes after tcp_fin_timeout
    s.send("c", "R", 70.02, seq=s.nxt["c"])   # no socket any more: bare RST
    a = s.analyze()
    r = row(a)
    assert (r.close_type, r.rst_kind, r.fin_wait2_timeout) == ("fin_then_reset", "reply_to_closed", True)
    c_ep, _ = a.endpoint(0)
    assert c_ep.states[-2:] == ["FIN_WAIT_2", "CLOSED"]
    assert c_ep.times[-1] == pytest.approx(r.first_ts + 61.02)


def test_data_to_a_closed_socket_is_no_fin_wait2_timeout():
    s = Script()
    s.handshake()
    s.send("c", "FA", 1.0)
    s.send("s", "A", 1.02)
    s.send("s", "PA", 1.5, plen=100)
    s.send("c", "R", 1.52, seq=s.nxt["c"])
    r = row(s.analyze())
    assert (r.rst_kind, r.fin_wait2_timeout, r.half_close_bytes) == ("reply_to_closed", False, 100)


def test_refused_and_unanswered():
    s = Script()
    s.send("c", "S", 0.0)
    s.send("s", "RA", 0.001, seq=0)
    r = row(s.analyze())
    assert (r.close_type, r.rst_kind, r.handshake, r.active_closer) == ("refused", "refused", "partial", "none")
    u = Script()
    for t in (0, 1, 3):
        u.send("c", "S", t, seq=1000)
    r = row(u.analyze())
    assert r.close_type == "unanswered" and r.packets == 3 and r.client_state_end == "SYN_SENT"


def test_half_close_counts_data_after_the_fin():
    s = Script()
    s.handshake(at="server")
    s.send("c", "FA", 1.0)
    s.send("s", "A", 1.0001)
    for k in range(3):
        s.send("s", "PA", 1.1 + k * 0.1, plen=1000)
        s.send("c", "A", 1.12 + k * 0.1)
    s.send("s", "FA", 2.0)
    s.send("c", "A", 2.02)
    a = s.analyze()
    r = row(a)
    assert r.half_close_bytes == 3000 and r.close_type == "four_way"
    assert ("server", "DATA_AFTER_FIN") in kinds(a)
    assert r.close_wait_s == pytest.approx(2.0 - 1.0)


def test_keepalive_probes_then_abort():
    s = Script()
    s.handshake()
    s.send("c", "PA", 0.1, plen=10)
    s.send("s", "A", 0.12)
    probe_seq = s.nxt["c"] - 1
    s.send("c", "A", 2.0, seq=probe_seq)
    s.send("s", "A", 2.02)
    for t in (4.0, 5.0, 6.0):
        s.send("c", "A", t, seq=probe_seq)
    s.send("c", "RA", 7.0)
    a = s.analyze()
    r = row(a)
    assert r.client_keepalives == 4 and r.server_keepalives == 0
    assert r.rst_kind == "keepalive_timeout"
    assert kinds(a).count(("server", "KEEPALIVE_ACK")) == 1


def test_capture_starting_mid_teardown():
    s = Script(client=("10.0.0.1", 51000), server=("10.0.0.2", 443))
    s.send("s", "PA", 0.0, plen=200)   # no handshake seen; the server speaks first
    s.send("c", "FA", 0.5)
    s.send("s", "A", 0.52)
    s.send("s", "FA", 0.53)
    s.send("c", "A", 0.55)
    r = row(s.analyze())
    assert (r.handshake, r.roles_inferred, r.server_port) == ("none", True, 443)
    assert (r.close_type, r.active_closer, r.client_state_end) == ("four_way", "client", "TIME_WAIT")


def test_syn_into_time_wait_with_lower_isn_is_unsafe_reuse():
    s = Script(cisn=900_000)
    s.handshake()
    four_way(s, 1.0)
    s.nxt = {"c": 10, "s": 70_000}  # the new connection: ISN below the old one's end
    s.handshake(t=5.0)
    four_way(s, 6.0)
    a = s.analyze()
    assert list(a.connections["incarnation"]) == [0, 1]
    new = row(a, 1)
    assert new.reused_4tuple and new.reuse_check == "unsafe"
    assert new.reuse_gap_s == pytest.approx(5.0 - 1.03, abs=0.01)


def test_linux_time_wait_reuse_signature_isn_is_old_snd_nxt_plus_65537():
    s = Script()
    s.handshake()
    four_way(s, 1.0)
    old_end = s.nxt["c"]
    s.nxt["c"] = old_end + 65537
    s.handshake(t=2.0)
    r = row(s.analyze(), 1)
    assert (r.reused_4tuple, r.reuse_check, r.reuse_isn_signature) == (True, "isn_higher", True)


def test_syn_old_ack_rst_syn_keeps_two_incarnations():
    s = Script()
    s.handshake()
    s.send("c", "FA", 1.0)
    s.send("s", "A", 1.02)                  # the server stays in CLOSE_WAIT
    old_c = s.nxt["c"]
    s.send("c", "S", 3.0, seq=777_777, ack=0)
    s.send("s", "A", 3.02, seq=s.nxt["s"], ack=old_c)   # the old connection answers
    s.send("c", "R", 3.021, seq=old_c, ack=0)           # the client resets it
    s.send("c", "S", 4.0, seq=777_777, ack=0)           # and retries its SYN
    s.nxt["c"] = 777_778
    s.send("s", "SA", 4.02, seq=123, ack=777_778)
    a = s.analyze()
    assert len(a.connections) == 2
    old, new = row(a, 0), row(a, 1)
    assert (old.close_type, old.rst_by, old.server_state_end) == ("fin_then_reset", "client", "CLOSED")
    assert new.packets == 3 and new.handshake == "partial" and not new.reused_4tuple
    met = a.events[(a.events["conn_id"] == 1) & a.events["detail"].str.startswith("met connection 0")]
    assert len(met) == 1 and "+0.021 s" in met["detail"].iloc[0]


def test_retransmitted_fin_and_final_ack_never_open_a_new_connection():
    s = Script()
    s.handshake()
    four_way(s, 1.0)
    s.send("s", "FA", 1.3, seq=s.nxt["s"] - 1)
    s.send("c", "A", 1.32)
    s.send("c", "R", 1.5, seq=s.nxt["c"])
    assert len(s.analyze().connections) == 1


def test_states_at_an_instant_are_netstat_like():
    a_s = Script(client=("10.0.0.1", 40001))
    a_s.handshake()
    four_way(a_s, 1.0)
    b_s = Script(client=("10.0.0.1", 40002))
    b_s.handshake(t=0.5)
    b_s.send("c", "FA", 2.0)
    b_s.send("s", "A", 2.02)
    rows = a_s.rows + b_s.rows
    a_s.rows = rows
    a = a_s.analyze(end=10)
    end = a.states().set_index(["host", "state"])["count"].to_dict()
    assert end == {("10.0.0.1", "TIME_WAIT"): 1, ("10.0.0.1", "FIN_WAIT_2"): 1,
                   ("10.0.0.2", "CLOSE_WAIT"): 1}
    early = a.states(at=a_s.t0 + 0.7).set_index(["host", "state"])["count"].to_dict()
    assert early == {("10.0.0.1", "ESTABLISHED"): 2, ("10.0.0.2", "ESTABLISHED"): 2}
    tl = a.state_timeline("500ms")
    assert len(tl) == 21 and tl["TIME_WAIT"].iloc[-1] == 1
    for when, counts in tl.iterrows():  # the timeline agrees with states() at every step
        st = a.states(at=when.timestamp()).groupby("state")["count"].sum()
        assert counts[counts > 0].to_dict() == st.to_dict(), when


def test_orphan_give_up_then_the_peers_data_gets_a_bare_rst():
    s = Script()
    s.handshake()
    fin = s.nxt["c"]
    for t in (1.0, 1.226, 1.454, 1.930, 2.858):  # measured in the lab (tcp_orphan_retries=3)
        s.send("c", "FA", t, seq=fin)
    s.send("s", "PA", 8.0, plen=10, ack=fin)      # the server never got the FIN
    s.send("c", "R", 8.02, seq=fin)               # the client has no socket any more
    a = s.analyze()
    r = row(a)
    assert (r.close_type, r.rst_kind, r.lost_waves) == ("fin_then_reset", "reply_to_closed", [1])
    assert r.orphan_retries_estimate == 3  # the lab's sysctl: budget 3.0 s after the first FIN
    c_ep, s_ep = a.endpoint(0)
    assert "UNKNOWN" not in s_ep.states and s_ep.states[-2:] == ["ESTABLISHED", "CLOSED"]
    assert c_ep.states[-1] == "CLOSED" and c_ep.times[-1] == pytest.approx(r.first_ts + 2.858 + 2 * 0.928)


def test_both_time_waits_of_a_simultaneous_close_expire():
    s = Script()
    s.handshake(at="middle")
    cfin = s.nxt["c"]
    s.send("c", "FA", 1.0)
    s.send("s", "FA", 1.0005, ack=cfin)
    s.send("c", "A", 1.01)
    s.send("s", "A", 1.0105)
    a = s.analyze(end=100)
    r = row(a)
    assert (r.time_wait_side, r.client_state_end, r.server_state_end) == ("both", "CLOSED", "CLOSED")
    expired = a.events[a.events["detail"] == "2MSL expired"]
    assert sorted(expired["side"]) == ["client", "server"]


def test_server_data_before_the_handshake_ack_still_completes_the_handshake():
    s = Script()
    s.send("c", "S", 0.0)
    s.send("s", "SA", 0.02)
    s.send("s", "PA", 0.021, plen=85)   # the server speaks first (banner), then closes
    s.send("s", "FA", 0.022)
    s.send("c", "A", 0.04)              # acks SYN-ACK, data and FIN at once
    s.send("c", "FA", 0.05)
    s.send("s", "A", 0.07)
    r = row(s.analyze())
    assert (r.handshake, r.client_state_end, r.server_state_end) == ("complete", "CLOSED", "TIME_WAIT")
    assert r.close_wait_s == pytest.approx(0.01, abs=0.011)


def test_zero_window_probes_are_not_keepalives():
    s = Script()
    s.handshake()
    s.send("c", "PA", 0.1, plen=1000)
    s.send("s", "A", 0.12, win=0)                    # the server's receive window is full
    probe_seq = s.nxt["c"] - 1
    for t in (0.5, 1.0, 2.0):                        # Linux probes a zero window with seq = una - 1
        s.send("c", "A", t, seq=probe_seq)
        s.send("s", "A", t + 0.02, win=0)
    r = row(s.analyze())
    assert (r.client_keepalives, r.server_keepalives) == (0, 0)


def test_one_sided_capture_infers_the_unseen_syn_ack():
    s = Script()
    s.send("c", "S", 0.0)
    s.nxt["s"] += 1                       # the server's SYN-ACK went another way
    s.send("c", "A", 0.02)
    s.send("c", "PA", 0.03, plen=100)
    s.send("c", "FA", 1.0)
    a = s.analyze(end=1.05)
    r = row(a)
    c_ep, s_ep = a.endpoint(0)
    assert r.handshake == "partial" and c_ep.states[:3] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT_1"]
    assert s_ep.states[:2] == ["SYN_RECEIVED", "ESTABLISHED"]
    assert (r.client_state_end, r.server_state_end) == ("FIN_WAIT_1", "UNKNOWN")
