"""principals_as_groups (#21): a certificate principal naming a group grants that group's rules for the session.
The pure parts: which groups a certificate brings (certificate_groups), and evaluate / evaluate_listen /
listen_ranges with a request's extra_groups. Deny-by-default holds: nothing else changes."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address, ip_address

import pytest
from hypothesis import given, strategies as st

from bastion.policy.certificates import Certificate, certificate_groups, key_fingerprint
from bastion.policy.decide import evaluate, evaluate_listen, listen_ranges
from bastion.policy.file import parse_policy
from bastion.policy.model import AccessRequest, ListenRequest
from bastion.policy.netguard import NetGuard, parse_networks

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
CA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICFtjMtQBVvxaVO/u0cT5WUGES839vSXnWwcF8VYcOJS ca@corp"
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl other@corp"
GUARD = NetGuard(internal_networks=parse_networks(["10.0.0.0/8"]))

POLICY = parse_policy(f"""
[cas.corp]
key = "{CA}"
principals_as_groups = true
require_known_user = false

[cas.plain]
key = "{OTHER}"

[groups.ops]
allow = ["10.1.0.0/16:22"]
deny = ["10.1.9.9"]
listen = ["127.0.0.1:9000-9009"]

[groups.dba]
allow = ["10.2.0.0/16:5432"]

[users.alice]
allow = ["10.3.0.1:22"]

[users.old]
expires = 2026-01-01T00:00:00Z
""")


def cert(*principals: str, ca: str = CA) -> Certificate:
    return Certificate(key_id="k", serial=1, user_certificate=True, principals=principals, valid_after=0,
                       valid_before=2 ** 63, ca_fingerprint=key_fingerprint(ca) or "")


def request(user: str, address: str, port: int = 22, groups: tuple[str, ...] = ()) -> AccessRequest:
    host = ip_address(address)
    return AccessRequest(user=user, host=host, addresses=(host,), port=port, now=NOW, extra_groups=groups)


@pytest.mark.parametrize("principals, user, expected", [
    (("alice", "ops"), "alice", ("ops",)),
    (("alice", "ops", "dba", "ops"), "alice", ("ops", "dba")),
    (("alice", "nosuchgroup", "bob"), "alice", ()),  # only principals that name a group of the policy
    (("ops",), "ops", ()),  # the login user's own principal is never a group
])
def test_certificate_groups(principals, user, expected):
    assert certificate_groups(POLICY, cert(*principals), user) == expected


def test_certificate_groups_need_the_ca_to_say_so():
    assert certificate_groups(POLICY, cert("alice", "ops", ca=OTHER), "alice") == ()  # principals_as_groups false
    untrusted = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1c7eIaN8fDcLZSXL5zXJrjJvjn0bGjCQAd2LP5wFuY x"
    assert certificate_groups(POLICY, cert("alice", "ops", ca=untrusted), "alice") == ()


@pytest.mark.parametrize("user, address, port, groups, allowed, rule", [
    ("alice", "10.1.2.3", 22, (), False, None),  # without the certificate's groups: alice's own rules only
    ("alice", "10.1.2.3", 22, ("ops",), True, "groups.ops.allow via certificate: 10.1.0.0/16:22"),
    ("alice", "10.3.0.1", 22, ("ops",), True, "users.alice.allow: 10.3.0.1:22"),  # own rules first
    ("alice", "10.1.9.9", 22, ("ops",), False, "groups.ops.deny via certificate: 10.1.9.9"),  # its denies too
    ("alice", "10.2.0.5", 5432, ("ops",), False, None),  # only the groups named
    ("alice", "10.2.0.5", 5432, ("ops", "dba"), True, "groups.dba.allow via certificate: 10.2.0.0/16:5432"),
    ("mallory", "10.1.2.3", 22, ("ops",), True, "groups.ops.allow via certificate: 10.1.0.0/16:22"),  # unknown
    ("mallory", "10.1.2.3", 22, (), False, None),
    ("mallory", "10.1.2.3", 22, ("nosuchgroup",), False, None),  # unknown user, no real group: unknown
    ("old", "10.1.2.3", 22, ("ops",), False, None),  # an expired user stays expired
    ("alice", "127.0.0.1", 22, ("ops",), False, None),  # the guard still decides first
])
def test_evaluate_with_extra_groups(user, address, port, groups, allowed, rule):
    decision = evaluate(POLICY, GUARD, request(user, address, port, groups))
    assert decision.allowed is allowed, decision
    if rule is not None:
        assert decision.rule == rule
    if user == "mallory" and not groups:
        assert decision.reason.startswith("unknown user")
    if user == "old":
        assert decision.reason.startswith("access for old expired")


def test_listen_with_extra_groups():
    bind = IPv4Address("127.0.0.1")
    plain = ListenRequest(user="alice", bind=bind, port=9001, now=NOW)
    assert not evaluate_listen(POLICY, plain).allowed
    granted = evaluate_listen(POLICY, ListenRequest(user="alice", bind=bind, port=9001, now=NOW, extra_groups=("ops",)))
    assert granted.allowed and granted.rule == "groups.ops.listen via certificate: 127.0.0.1:9000-9009"
    assert listen_ranges(POLICY, "alice", bind, NOW) == []
    assert listen_ranges(POLICY, "mallory", bind, NOW, ("ops",)) == [(9000, 9009)]


def test_a_group_the_user_is_already_in_is_listed_once():
    policy = parse_policy('[groups.ops]\nallow = ["10.1.0.0/16:22"]\n[users.alice]\ngroups = ["ops"]\n')
    assert [origin for origin, _ in policy.grants_for("alice", ("ops", "ops"))] == ["groups.ops.allow"]


@given(st.lists(st.sampled_from(["ops", "dba", "alice", "x", "nosuchgroup"]), max_size=5),
       st.sampled_from(["10.1.2.3", "10.2.0.5", "10.3.0.1", "10.9.9.9", "10.1.9.9"]), st.sampled_from([22, 5432]))
def test_extra_groups_only_ever_add_the_named_groups_rules(groups, address, port):
    """An allowed request with extra groups is allowed by a rule of the user or of one of those groups, and
    whatever the user alone may reach stays reachable unless one of those groups denies it."""
    decision = evaluate(POLICY, GUARD, request("alice", address, port, tuple(groups)))
    alone = evaluate(POLICY, GUARD, request("alice", address, port))
    if decision.allowed:
        assert decision.rule.startswith("users.alice.") or any(
            decision.rule.startswith(f"groups.{g}.allow via certificate") for g in groups)
    if alone.allowed and not decision.allowed:
        assert "via certificate" in (decision.rule or "")
