"""Pre-authentication limits: random early drop and per-source penalties, with a fake clock."""

import pytest
from hypothesis import given, strategies as st

from bastion.policy.limits import SourcePenalties, StartupLimit, is_exempt, source_of
from bastion.policy.netguard import parse_networks


def test_startup_limit_parse_and_drop_curve():
    limit = StartupLimit.parse("10:30:100")
    assert str(limit) == "10:30:100"
    assert not limit.should_drop(9, 0.0)
    assert limit.should_drop(10, 0.29) and not limit.should_drop(10, 0.31)
    assert limit.should_drop(55, 0.64) and not limit.should_drop(55, 0.66)
    assert limit.should_drop(100, 0.999)


@pytest.mark.parametrize("text", ["", "a:b:c", "10:30", "0:30:100", "10:0:100", "10:101:100", "50:30:10"])
def test_startup_limit_rejects(text):
    with pytest.raises(ValueError):
        StartupLimit.parse(text)


@given(st.integers(1, 200), st.integers(1, 100), st.integers(0, 300), st.floats(0, 0.999999))
def test_drop_probability_only_grows(start, rate, waiting, draw):
    limit = StartupLimit(start, rate, start + 50)
    if limit.should_drop(waiting, draw):
        assert limit.should_drop(waiting + 1, draw)


@pytest.mark.parametrize(
    "address, source",
    [("192.0.2.7", "192.0.2.7"), ("2001:db8::1", "2001:db8::/64"), ("2001:db8::ffff:1", "2001:db8::/64"),
     ("::ffff:192.0.2.7", "192.0.2.7")],
)
def test_source_of(address, source):
    assert source_of(address) == source


def test_penalty_starts_at_threshold_and_doubles():
    penalties = SourcePenalties(threshold=3, base=10, maximum=25)
    now = 1000.0
    assert penalties.failed("192.0.2.7", now) is None
    assert penalties.failed("192.0.2.7", now) is None
    assert penalties.failed("192.0.2.7", now) == 10
    assert penalties.refused_until("192.0.2.7", now + 5) == now + 10
    assert penalties.refused_until("192.0.2.8", now + 5) is None  # other sources are not affected
    assert penalties.refused_until("192.0.2.7", now + 10) is None
    for _ in range(2):
        assert penalties.failed("192.0.2.7", now + 11) is None
    assert penalties.failed("192.0.2.7", now + 11) == 20
    for _ in range(3):
        length = penalties.failed("192.0.2.7", now + 40)
    assert length == 25  # capped


def test_ipv6_neighbours_share_a_penalty_and_success_resets_failures():
    penalties = SourcePenalties(threshold=2, base=10)
    penalties.failed("2001:db8::1", 0)
    penalties.succeeded("2001:db8::2")
    assert penalties.failed("2001:db8::3", 0) is None  # the count was reset by the success
    assert penalties.failed("2001:db8::4", 0) == 10
    assert penalties.refused_until("2001:db8::99", 1) == 10


def test_memory_is_bounded():
    penalties = SourcePenalties(threshold=100, max_sources=100)
    for n in range(1000):
        penalties.failed(f"10.0.{n // 256}.{n % 256}", 0)
    assert len(penalties._sources) == 100


def test_failures_during_a_penalty_do_not_stack_penalties():
    """A burst of 50 parallel failures starts one penalty, not a ladder up to the maximum."""
    penalties = SourcePenalties(threshold=5, base=30, maximum=3600)
    started = [penalties.failed("10.0.0.1", n / 50) for n in range(50)]
    assert [length for length in started if length is not None] == [30]
    for n in range(5):  # after the penalty, the next burst doubles it
        length = penalties.failed("10.0.0.1", 31 + n)
    assert length == 60


@pytest.mark.parametrize(
    "address, exempt",
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 client on a dual-stack socket
        ("11.0.0.1", False),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
    ],
)
def test_exempt_sources_are_those_inside_the_list(address, exempt):
    networks = parse_networks(["10.0.0.0/8", "2001:db8::/32"])
    assert is_exempt(address, networks) is exempt


def test_an_empty_exempt_list_spares_nobody():
    assert not is_exempt("10.1.2.3", ())
