"""logs.PeerLog: at most one line per peer per period, the rest counted; bounded however many peers come."""

from __future__ import annotations

import logging

import pytest

from server.logs import PeerLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_a_peer_gets_one_line_a_period_and_the_next_says_how_many_were_left_out(caplog, clock):
    """Fails if PeerLog.warning logs every call (the count of left-out refusals is then never told)."""
    log = PeerLog(logging.getLogger("test.peers"), period=60, clock=clock)
    with caplog.at_level(logging.WARNING):
        assert log.warning("10.0.0.1", "refused a request: 431") is True
        for _ in range(5):
            clock.now += 10
            assert log.warning("10.0.0.1", "closed an idle connection") is False
        assert log.warning("10.0.0.2", "refused a request: 431") is True  # another peer has its own minute
        clock.now = 60
        assert log.warning("10.0.0.1", "closed an idle connection") is True
    assert lines(caplog) == [
        "10.0.0.1: refused a request: 431",
        "10.0.0.2: refused a request: 431",
        "10.0.0.1: closed an idle connection (5 more since the last line about this peer)",
    ]


def test_past_its_bound_new_peers_share_one_line_and_old_ones_are_forgotten(caplog, clock):
    """Fails without the bound on remembered peers: ten peers would be ten lines and ten entries."""
    log = PeerLog(logging.getLogger("test.peers"), period=60, peers=3, clock=clock)
    with caplog.at_level(logging.WARNING):
        for n in range(10):
            log.warning(f"10.0.0.{n}", "refused")
        clock.now = 61  # every peer's minute has passed: they are forgotten as new ones come
        log.warning("10.0.1.1", "refused")
    assert lines(caplog) == ["10.0.0.0: refused", "10.0.0.1: refused", "10.0.0.2: refused",
                             "other peers: refused", "10.0.1.1: refused"]
    assert len(log._seen) <= 4
