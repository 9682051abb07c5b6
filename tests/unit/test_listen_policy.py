"""Listen rules (ssh -R): parsing, the wire bind address, and the pure decision."""

from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
from hypothesis import given, strategies as st

from bastion.policy.model import ListenRequest, parse_bind_address, parse_listen_rule
from bastion.policy.decide import evaluate_listen, listen_ranges
from bastion.policy.netguard import TargetError
from bastion.policy.model import PolicyError
from bastion.policy.decide import next_expiry
from bastion.policy.file import parse_policy, policy_from_dict, policy_to_dict

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

POLICY = parse_policy("""
[groups.devs]
listen = ["127.0.0.1:9000-9009"]

[users.alice]
groups = ["devs"]
listen = ["*:8443", {target = ":7000", expires = 2026-11-21T13:00:00Z}]

[users.bob]
expires = 2026-11-21T11:00:00Z
listen = ["localhost:9100"]

[users.carol]
""")


@pytest.mark.parametrize(
    "wire, expected",
    [
        ("localhost", "127.0.0.1"), ("LOCALHOST", "127.0.0.1"), ("", "0.0.0.0"), ("*", "0.0.0.0"),
        ("0.0.0.0", "0.0.0.0"), ("::", "::"), ("[::]", "::"), ("::1", "::1"), ("127.1", "127.0.0.1"),
        ("10.0.5.1", "10.0.5.1"), ("::ffff:127.0.0.1", "127.0.0.1"),
    ],
)
def test_bind_address_on_the_wire(wire, expected):
    assert parse_bind_address(wire) == ip_address(expected)


@pytest.mark.parametrize("wire", ["example.com", "local host", "x" * 300, "127.0.0.1\x00", "ｌocalhost"])
def test_bind_address_refuses_names_and_junk(wire):
    with pytest.raises(TargetError):
        parse_bind_address(wire)


@pytest.mark.parametrize(
    "text, bind, port_in, port_out",
    [
        ("127.0.0.1:9000-9099", "127.0.0.1", 9050, 9100),
        (":9000", "127.0.0.1", 9000, 9001),          # empty bind in a rule means loopback
        ("localhost:9000", "127.0.0.1", 9000, 8999),
        ("*:8443", "0.0.0.0", 8443, 8444),
        ("0.0.0.0:1-2", "0.0.0.0", 2, 3),
        ("[::]:443", "::", 443, 444),
        ("[::1]:9000,9002", "::1", 9002, 9001),
        ("10.0.5.1:8443", "10.0.5.1", 8443, 8442),
    ],
)
def test_parse_listen_rule(text, bind, port_in, port_out):
    rule = parse_listen_rule(text)
    assert rule.bind == ip_address(bind)
    assert rule.matches(ip_address(bind), port_in) and not rule.matches(ip_address(bind), port_out)
    assert rule.matches(ip_address(bind), 0)


@pytest.mark.parametrize("text", ["", "9000", "127.0.0.1", "127.0.0.1:", "::1:9000", "host.example:9000",
                                  "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:9001-9000", "x" * 2000])
def test_parse_listen_rule_refuses(text):
    with pytest.raises(PolicyError):
        parse_listen_rule(text)


@given(st.text(max_size=80))
def test_parse_listen_rule_never_crashes(text):
    try:
        rule = parse_listen_rule(text)
    except PolicyError:
        return
    assert 1 <= rule.ports.ranges[0][0]


def decide(user, bind, port, now=NOW):
    return evaluate_listen(POLICY, ListenRequest(user=user, bind=ip_address(bind), port=port, now=now))


@pytest.mark.parametrize(
    "user, bind, port, allowed, rule",
    [
        ("alice", "127.0.0.1", 9005, True, "groups.devs.listen: 127.0.0.1:9000-9009"),
        ("alice", "127.0.0.1", 0, True, "users.alice.listen: :7000"),
        ("alice", "127.0.0.1", 9010, False, None),
        ("alice", "0.0.0.0", 8443, True, "users.alice.listen: *:8443"),
        ("alice", "0.0.0.0", 9005, False, None),      # a loopback grant never opens the wildcard
        ("alice", "::", 8443, False, None),           # nor does an IPv4 wildcard open IPv6
        ("alice", "127.0.0.1", 7000, True, "users.alice.listen: :7000"),
        ("bob", "127.0.0.1", 9100, False, None),      # expired user
        ("carol", "127.0.0.1", 9000, False, None),    # nothing granted by default
        ("mallory", "127.0.0.1", 9000, False, None),  # unknown user
    ],
)
def test_evaluate_listen(user, bind, port, allowed, rule):
    decision = decide(user, bind, port)
    assert decision.allowed is allowed
    assert decision.rule == rule


def test_expired_listen_grant_is_skipped():
    assert decide("alice", "127.0.0.1", 7000, NOW + timedelta(hours=2)).allowed is False
    assert decide("alice", "127.0.0.1", 7000, NOW + timedelta(hours=2)).reason.startswith("alice may not listen on 127.0.0.1:7000")


def test_listen_ranges_for_port_zero():
    assert sorted(listen_ranges(POLICY, "alice", ip_address("127.0.0.1"), NOW)) == [(7000, 7000), (9000, 9009)]
    assert listen_ranges(POLICY, "alice", ip_address("127.0.0.1"), NOW + timedelta(hours=2)) == [(9000, 9009)]
    assert listen_ranges(POLICY, "carol", ip_address("127.0.0.1"), NOW) == []


def test_listen_rules_round_trip_through_storage():
    assert policy_from_dict(policy_to_dict(POLICY)) == POLICY


def test_next_expiry_finds_users_and_grants():
    assert next_expiry(POLICY, NOW) == datetime(2026, 11, 21, 13, 0, tzinfo=UTC)
    assert next_expiry(POLICY, datetime(2026, 11, 21, 13, 0, tzinfo=UTC)) is None
    assert next_expiry(POLICY, datetime(2026, 11, 21, 10, 0, tzinfo=UTC)) == datetime(2026, 11, 21, 11, 0, tzinfo=UTC)
