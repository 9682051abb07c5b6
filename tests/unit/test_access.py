"""policy/access.py: effective grants of a user, who can reach a target, and both agreeing with evaluate()."""

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policy.access import (
    Grant,
    Reach,
    _patterns_overlap,
    allowed_ports,
    effective_grants,
    guard_refusal,
    target_refusal,
    who_can_reach,
)
from bastion.policy.decide import evaluate
from bastion.policy.file import parse_policy
from bastion.policy.model import AccessRequest, GroupPolicy, Policy, UserPolicy, parse_target_rule
from bastion.policy.netguard import NetGuard

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=timezone.utc)
GUARD = NetGuard()

POLICY = parse_policy("""
[groups.ops]
allow = ["10.20.0.0/16:22", "*.db.corp.internal:5432", "[fd00:1::/64]:22,443",
         { target = "10.30.0.0/24:*", expires = 2030-07-01T00:00:00Z }]
deny = ["10.20.0.9"]
listen = ["127.0.0.1:9000-9099"]

[groups.gone]
allow = [{ target = "10.40.0.0/24", expires = 2030-01-01T00:00:00Z }]

[users.alice]
groups = ["ops", "gone", "missing"]
allow = ["10.1.2.3:22,8000-8100", "10.20.0.0/24:22", "pg1.db.corp.internal:5432"]
deny = ["10.20.0.0/28:22", "*.db.corp.internal:5433", "pg*.db.corp.internal:5432"]
listen = [":7000", "[::1]:7001"]
expires = 2031-01-31T00:00:00Z

[users.bob]
allow = ["10.1.2.3"]

[users.erin]
allow = ["10.1.2.3"]
expires = 2030-01-01T00:00:00Z
""")


def grant(rule, *, via="group ops", kind="open", expires=datetime(2031, 1, 31, tzinfo=timezone.utc), except_=()):
    return next(g for g in effective_grants(POLICY, "alice", NOW) if g.rule == rule and g.via == via
                and g.kind == kind)


def test_effective_grants_of_a_user_in_policy_order_open_before_listen():
    grants = effective_grants(POLICY, "alice", NOW)
    assert [(g.kind, g.via, g.rule) for g in grants] == [
        ("open", "user alice", "10.1.2.3:22,8000-8100"),
        ("open", "user alice", "10.20.0.0/24:22"),
        ("open", "user alice", "pg1.db.corp.internal:5432"),
        ("open", "group ops", "10.20.0.0/16:22"),
        ("open", "group ops", "*.db.corp.internal:5432"),
        ("open", "group ops", "[fd00:1::/64]:22,443"),
        ("open", "group ops", "10.30.0.0/24:*"),
        ("listen", "user alice", ":7000"),
        ("listen", "user alice", "[::1]:7001"),
        ("listen", "group ops", "127.0.0.1:9000-9099"),
    ]  # groups.gone's only grant has expired; "missing" is no group


def test_a_grant_shows_target_ports_and_the_earliest_expiry():
    user_expiry = datetime(2031, 1, 31, tzinfo=timezone.utc)
    assert grant("10.1.2.3:22,8000-8100", via="user alice") == Grant(
        "open", "10.1.2.3", "22,8000-8100", "user alice", "10.1.2.3:22,8000-8100", user_expiry, ())
    assert grant("[fd00:1::/64]:22,443").target == "[fd00:1::/64]"
    assert grant("*.db.corp.internal:5432").target == "*.db.corp.internal"
    rule_first = grant("10.30.0.0/24:*")
    assert (rule_first.ports, rule_first.expires) == ("any", datetime(2030, 7, 1, tzinfo=timezone.utc))
    assert grant(":7000", via="user alice", kind="listen").target == "127.0.0.1"
    assert grant("[::1]:7001", via="user alice", kind="listen").target == "[::1]"
    assert grant("127.0.0.1:9000-9099", kind="listen").ports == "9000-9099"


def test_denies_that_cut_into_a_grant_are_named_with_their_origin():
    assert grant("10.20.0.0/16:22").except_ == ("users.alice.deny: 10.20.0.0/28:22", "groups.ops.deny: 10.20.0.9")
    assert grant("10.20.0.0/24:22", via="user alice").except_ == grant("10.20.0.0/16:22").except_
    # the deny on 5433 shares no port; pg* overlaps both the pattern and the name
    assert grant("*.db.corp.internal:5432").except_ == ("users.alice.deny: pg*.db.corp.internal:5432",)
    assert grant("pg1.db.corp.internal:5432", via="user alice").except_ == grant("*.db.corp.internal:5432").except_
    assert grant("10.1.2.3:22,8000-8100", via="user alice").except_ == ()
    assert grant("[fd00:1::/64]:22,443").except_ == ()  # an IPv4 deny never cuts into IPv6
    assert grant(":7000", via="user alice", kind="listen").except_ == ()  # denies are for targets, not binds


def test_unknown_and_expired_users_have_no_grants_and_grants_are_hashable():
    assert effective_grants(POLICY, "nobody", NOW) == []
    assert effective_grants(POLICY, "erin", NOW) == []
    assert len(effective_grants(POLICY, "erin", NOW - timedelta(days=365))) == 1
    before = set(effective_grants(POLICY, "alice", NOW))
    after = set(effective_grants(POLICY, "alice", datetime(2030, 8, 1, tzinfo=timezone.utc)))
    assert {g.rule for g in before - after} == {"10.30.0.0/24:*"}


@pytest.mark.parametrize(("first", "second", "overlap"), [
    ("a.corp", "a.corp", True), ("a.corp", "b.corp", False), ("*.corp", "a.corp", True),
    ("*.corp", "a.b.corp", False), ("pg*.corp", "*1.corp", True), ("pg*.corp", "db*.corp", False),
    ("*-a.corp", "*-b.corp", False), ("a*x*b.corp", "a*y*b.corp", True), ("ab*.corp", "a*.corp", True),
])
def test_name_patterns_overlap(first, second, overlap):
    assert _patterns_overlap(first, second) is overlap
    assert _patterns_overlap(second, first) is overlap


def test_who_can_reach_an_address_at_a_port():
    reaches = who_can_reach(POLICY, GUARD, IPv4Address("10.1.2.3"), (IPv4Address("10.1.2.3"),), 22, NOW)
    assert reaches == [
        Reach("alice", True, "users.alice.allow: 10.1.2.3:22,8000-8100", "22", datetime(2031, 1, 31, tzinfo=timezone.utc),
              "granted"),
        Reach("bob", True, "users.bob.allow: 10.1.2.3", "22", None, "granted"),
        Reach("erin", False, "users.erin.allow: 10.1.2.3", "22", None,
              "access for erin expired at 2030-01-01T00:00:00Z"),
    ]


def test_who_can_reach_names_the_deny_that_refuses():
    reaches = who_can_reach(POLICY, GUARD, IPv4Address("10.20.0.9"), (IPv4Address("10.20.0.9"),), 22, NOW)
    assert [(r.user, r.allowed, r.rule) for r in reaches] == [("alice", False, "users.alice.deny: 10.20.0.0/28:22")]
    reaches = who_can_reach(POLICY, GUARD, IPv4Address("10.20.0.99"), (IPv4Address("10.20.0.99"),), 22, NOW)
    assert [(r.user, r.allowed, r.rule) for r in reaches] == [("alice", True, "users.alice.allow: 10.20.0.0/24:22")]


def test_who_can_reach_a_target_at_any_port():
    reaches = who_can_reach(POLICY, GUARD, IPv4Address("10.1.2.3"), (IPv4Address("10.1.2.3"),), None, NOW)
    assert [(r.user, r.allowed, r.ports, r.rule) for r in reaches] == [
        ("alice", True, "22,8000-8100", "users.alice.allow: 10.1.2.3:22,8000-8100"),
        ("bob", True, "22", "users.bob.allow: 10.1.2.3"),
        ("erin", False, "22", "users.erin.allow: 10.1.2.3"),
    ]
    reaches = who_can_reach(POLICY, GUARD, "pg1.db.corp.internal", (IPv4Address("10.50.5.5"),), None, NOW)
    assert [(r.user, r.allowed, r.ports, r.rule) for r in reaches] == [
        ("alice", False, "5432", "users.alice.deny: pg*.db.corp.internal:5432"),
    ]
    reaches = who_can_reach(POLICY, GUARD, "pg9.db.corp.internal", (IPv4Address("10.50.5.5"),), None, NOW)
    assert [(r.user, r.allowed, r.ports, r.rule) for r in reaches] == [
        ("alice", False, "5432", "users.alice.deny: pg*.db.corp.internal:5432"),
    ]
    reaches = who_can_reach(POLICY, GUARD, "mysql.db.corp.internal", (IPv4Address("10.50.5.5"),), None, NOW)
    assert [(r.user, r.allowed, r.ports, r.rule) for r in reaches] == [
        ("alice", True, "5432", "groups.ops.allow: *.db.corp.internal:5432"),
    ]
    reaches = who_can_reach(POLICY, GUARD, "pg1.db.corp.internal", (IPv4Address("10.20.0.99"),), None, NOW)
    assert [(r.user, r.allowed, r.ports, r.rule) for r in reaches] == [
        ("alice", True, "22", "users.alice.allow: 10.20.0.0/24:22"),
        ("alice", True, "22", "groups.ops.allow: 10.20.0.0/16:22"),
        ("alice", False, "5432", "users.alice.deny: pg*.db.corp.internal:5432"),
    ]


def test_a_target_the_guard_refuses_is_reachable_by_nobody_and_says_why_once():
    loopback = (IPv4Address("127.0.0.1"),)
    policy = parse_policy('[users.alice]\nallow = ["127.0.0.1:22"]\n')
    assert who_can_reach(policy, GUARD, loopback[0], loopback, 22, NOW) == []
    assert who_can_reach(policy, GUARD, loopback[0], loopback, None, NOW) == []
    assert target_refusal(GUARD, loopback[0], loopback) == "127.0.0.1 is a loopback address"
    assert target_refusal(GUARD, "a.corp", (IPv4Address("10.0.0.1"), loopback[0])) == "127.0.0.1 is a loopback address"
    assert target_refusal(GUARD, "a.corp", ()) == "a.corp did not resolve to an address"
    assert target_refusal(GUARD, "a.corp", (IPv6Address("fd00::1"),)) is None


# ---- agreement with evaluate(), for random small policies ------------------------------------------------------

RULES = ["10.0.0.0/24", "10.0.0.1", "10.0.0.2", "10.0.0.0/31", "a.corp", "*.corp", "b.corp", "127.0.0.1",
         "[fd00::/64]"]
PORTS = [None, "20", "21-23", "*", "22,25", "24-30"]
EXPIRIES = [None, NOW - timedelta(hours=1), NOW + timedelta(hours=1)]
ADDRESSES = [IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), IPv4Address("10.0.0.5"), IPv4Address("127.0.0.1"),
             IPv6Address("fd00::1")]
PROBE_PORTS = [1, 19, 20, 21, 22, 23, 24, 25, 26, 30, 31, 65535]


@st.composite
def rules(draw, deny):
    found = []
    for _ in range(draw(st.integers(0, 3))):
        host, ports = draw(st.sampled_from(RULES)), draw(st.sampled_from(PORTS))
        rule = parse_target_rule(host if ports is None else f"{host}:{ports}", any_port_when_omitted=deny)
        found.append(replace(rule, expires=draw(st.sampled_from(EXPIRIES))))
    return tuple(found)


@st.composite
def policies(draw):
    groups = {name: GroupPolicy(name, allow=draw(rules(False)), deny=draw(rules(True))) for name in ("g1", "g2")}
    users = {
        name: UserPolicy(name, groups=tuple(draw(st.lists(st.sampled_from(["g1", "g2", "gx"]), max_size=2))),
                         allow=draw(rules(False)), deny=draw(rules(True)), expires=draw(st.sampled_from(EXPIRIES)))
        for name in ("u1", "u2", "u3")
    }
    return Policy(users, groups)


@st.composite
def targets(draw):
    host = draw(st.sampled_from(["a.corp", "b.corp", "c.corp", *ADDRESSES]))
    if isinstance(host, str):
        addresses = tuple(dict.fromkeys(draw(st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=2))))
    else:
        addresses = (host,)
    return host, addresses


def allowed(policy, user, host, addresses, port):
    return evaluate(policy, GUARD, AccessRequest(user, host, addresses, port, NOW)).allowed


@settings(max_examples=300, deadline=None)
@given(policies(), targets(), st.sampled_from(PROBE_PORTS))
def test_every_allowed_request_is_covered_by_an_effective_grant(policy, target, port):
    host, addresses = target
    for user in (*policy.users, "nobody"):
        grants = [g for g in effective_grants(policy, user, NOW) if g.kind == "open"]
        assert all(g.expires is None or g.expires > NOW for g in grants)
        if allowed(policy, user, host, addresses, port):
            for address in addresses:
                assert any(parse_target_rule(g.rule).matches(host, address, port) for g in grants), (user, address)


@settings(max_examples=300, deadline=None)
@given(policies(), targets(), st.sampled_from(PROBE_PORTS))
def test_who_can_reach_a_port_lists_exactly_the_users_evaluate_allows(policy, target, port):
    host, addresses = target
    reaches = who_can_reach(policy, GUARD, host, addresses, port, NOW)
    assert {r.user for r in reaches if r.allowed} == {u for u in policy.users if allowed(policy, u, host, addresses, port)}
    assert all(r.allowed or not allowed(policy, r.user, host, addresses, port) for r in reaches)


@settings(max_examples=300, deadline=None)
@given(policies(), targets())
def test_who_can_reach_any_port_lists_exactly_the_ports_evaluate_allows(policy, target):
    host, addresses = target
    reaches = who_can_reach(policy, GUARD, host, addresses, None, NOW)
    for user in policy.users:
        ports = allowed_ports(reaches, user)
        for port in PROBE_PORTS:
            assert (port in ports) == allowed(policy, user, host, addresses, port), (user, port)


@pytest.mark.parametrize(("rule", "reason"), [
    ("127.0.0.1:22", "127.0.0.1 is a loopback address"),
    ("169.254.169.254:80", "169.254.169.254 is not in an internal network"),
    ("8.8.8.0/24", "8.8.8.0/24 is not in an internal network"),
    ("[::1]:22", "::1 is a loopback address"),
    ("10.1.2.3:22", None), ("10.0.0.0/8", None), ("*.corp", None), ("[fd00::/64]", None),
])
def test_a_grant_the_guard_makes_empty_says_why(rule, reason):
    grants = effective_grants(parse_policy(f'[users.alice]\nallow = ["{rule}"]\nlisten = ["127.0.0.1:9000"]\n'),
                              "alice", NOW)
    assert [guard_refusal(GUARD, g) for g in grants] == [reason, None]
