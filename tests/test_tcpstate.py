"""The automaton alone: tables in, states out, no captures involved."""
from pcapflow import tcpstate as t
from pcapflow.tcpstate import Endpoint


def run(events, start="ESTABLISHED"):
    ep = Endpoint()
    ep.start(start, 0.0)
    for k, e in enumerate(events, 1):
        ep.handle(e, float(k))
    return ep


def test_active_close_passes_fin_wait_states_to_time_wait():
    ep = run([t.SEND_FIN, t.RECV_ACK_OF_FIN, t.RECV_FIN, t.TIMEWAIT_EXPIRED])
    assert ep.states == ["ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2", "TIME_WAIT", "CLOSED"]


def test_passive_close_goes_through_close_wait_and_last_ack():
    ep = run([t.RECV_FIN, t.SEND_FIN, t.RECV_ACK_OF_FIN])
    assert ep.states == ["ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSED"]


def test_simultaneous_close_passes_closing():
    ep = run([t.SEND_FIN, t.RECV_FIN, t.RECV_ACK_OF_FIN])
    assert ep.states[1:] == ["FIN_WAIT_1", "CLOSING", "TIME_WAIT"]


def test_fin_carrying_the_ack_of_ours_is_read_ack_first():
    ep = run([t.SEND_FIN, t.RECV_ACK_OF_FIN, t.RECV_FIN])
    assert ep.state == "TIME_WAIT" and "CLOSING" not in ep.states


def test_rst_ends_every_state_including_time_wait():
    for start in t.RESETTABLE:
        ep = run([t.RECV_RST], start=start)
        assert ep.state == "CLOSED", start


def test_events_that_do_not_apply_leave_the_state_alone():
    ep = run([t.RECV_ACK_OF_FIN, t.TIMEWAIT_EXPIRED, t.RECV_SYN])
    assert ep.states == ["ESTABLISHED"]


def test_state_at_any_instant():
    ep = run([t.SEND_FIN, t.RECV_ACK_OF_FIN, t.RECV_FIN])
    assert ep.state_at(-1) is None
    assert ep.state_at(0.5) == "ESTABLISHED"
    assert ep.state_at(2.0) == "FIN_WAIT_2"
    assert ep.state_at(99) == "TIME_WAIT"


def test_orphan_gives_up_only_from_states_that_retransmit_a_fin():
    assert run([t.SEND_FIN, t.RETRIES_EXHAUSTED]).state == "CLOSED"
    assert run([t.RETRIES_EXHAUSTED]).state == "ESTABLISHED"
