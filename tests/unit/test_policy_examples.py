"""The example files in policies/ parse, are consistent, and decide the way their comments say."""

import json
from datetime import datetime, timezone
from ipaddress import ip_address
from pathlib import Path

import pytest

from bastion.policy.netguard import NetGuard, parse_host
from bastion.policy.model import AccessRequest
from bastion.policy.decide import evaluate
from bastion.ops.policy_files import load_policy_file
from bastion.policy.file import check_key_line, policy_from_dict, policy_to_dict

POLICIES = Path(__file__).resolve().parents[2] / "policies"
FILES = sorted(POLICIES.glob("*.toml"))
NOW = datetime(2036, 3, 1, tzinfo=timezone.utc)


def test_there_are_examples():
    assert {f.name for f in FILES} >= {"example.toml", "ops-team.toml",
                                       "contractor-expiring.toml", "ipv6.toml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_loads_cleanly(path):
    policy = load_policy_file(path)
    assert policy.users, "an example without users shows nothing"
    assert policy.problems() == []
    assert policy_from_dict(json.loads(json.dumps(policy_to_dict(policy)))) == policy
    for user in policy.users.values():
        for key in user.keys or ():
            assert check_key_line(key) == key


# (file, user, host, port, resolved addresses or None for an address host, now, allowed, rule or reason)
CASES = [
    ("example.toml", "alice", "10.1.2.3", 8050, None, NOW, True, "users.alice.allow: 10.1.2.3:22,8000-8100"),
    ("example.toml", "alice", "10.20.3.4", 22, None, NOW, True, "groups.ops.allow: 10.20.0.0/16:22"),
    ("example.toml", "alice", "10.20.0.9", 22, None, NOW, False, "users.alice.deny: 10.20.0.9"),
    ("example.toml", "alice", "pg1.db.corp.internal", 5432, ["10.30.0.4"], NOW, True,
     "groups.ops.allow: *.db.corp.internal:5432"),
    ("example.toml", "alice", "[fd00:1::7]", 443, None, NOW, True, "groups.ops.allow: [fd00:1::/64]:22,443"),
    ("example.toml", "alice", "10.9.9.9", 22, None, NOW, True, "users.alice.allow: 10.9.9.9:22"),
    ("example.toml", "alice", "10.9.9.9", 22, None, datetime(2036, 12, 1, 18, tzinfo=timezone.utc),
     False, "alice may not reach 10.9.9.9:22; ask your bastion admin for a grant"),
    ("example.toml", "alice", "10.1.2.3", 22, None, datetime(2037, 2, 1, tzinfo=timezone.utc), False,
     "access for alice expired at 2037-01-31T00:00:00Z; ask your bastion admin to renew it"),
    ("example.toml", "alice", "169.254.169.254", 80, None, NOW, False,
     "169.254.169.254 is not in an internal network"),
    ("example.toml", "bob", "git.corp.internal", 22, ["10.5.5.5"], NOW, True, "users.bob.allow: git.corp.internal:22"),
    ("example.toml", "bob", "10.20.3.4", 22, None, NOW, False, "bob may not reach 10.20.3.4:22; ask your bastion admin for a grant"),
    ("ops-team.toml", "carol", "10.20.3.4", 8081, None, NOW, True, "groups.oncall.allow: 10.20.0.0/16:22,8080-8089"),
    ("ops-team.toml", "carol", "10.20.99.5", 22, None, NOW, False, "groups.ops.deny: 10.20.99.0/24"),
    ("ops-team.toml", "carol", "10.30.0.9", 9100, None, NOW, True, "groups.ops.allow: 10.30.0.0/24:22,9100"),
    ("ops-team.toml", "dave", "pg2.db.corp.internal", 5432, ["10.40.1.2"], NOW, True,
     "groups.dba.allow: *.db.corp.internal:5432"),
    ("ops-team.toml", "dave", "legacy.db.corp.internal", 5432, ["10.40.1.3"], NOW, False,
     "users.dave.deny: legacy.db.corp.internal"),
    ("ops-team.toml", "dave", "10.20.3.4", 22, None, NOW, False, "dave may not reach 10.20.3.4:22; ask your bastion admin for a grant"),
    ("ops-team.toml", "svc_backup", "10.50.0.10", 873, None, NOW, True, "users.svc_backup.allow: 10.50.0.10:873"),
    ("ops-team.toml", "svc_backup", "10.50.0.10", 22, None, NOW, False, "svc_backup may not reach 10.50.0.10:22; ask your bastion admin for a grant"),
    ("contractor-expiring.toml", "erin", "10.60.0.20", 22, None, NOW, True, "groups.contractors.allow: 10.60.0.0/24:22"),
    ("contractor-expiring.toml", "erin", "10.60.0.1", 22, None, NOW, False, "groups.contractors.deny: 10.60.0.1"),
    ("contractor-expiring.toml", "erin", "10.60.1.15", 5432, None, NOW, True,
     "users.erin.allow: 10.60.1.15:22,5432"),
    ("contractor-expiring.toml", "erin", "10.60.1.15", 5432, None,
     datetime(2036, 3, 15, 17, tzinfo=timezone.utc), False, "erin may not reach 10.60.1.15:5432; ask your bastion admin for a grant"),
    # 2036-04-01T00:00:00+02:00 is 2036-03-31T22:00Z
    ("contractor-expiring.toml", "erin", "build-3.ci.corp.internal", 22, ["10.60.0.30"],
     datetime(2036, 3, 31, 21, 59, tzinfo=timezone.utc), True, "users.erin.allow: build-*.ci.corp.internal:22"),
    ("contractor-expiring.toml", "erin", "build-3.ci.corp.internal", 22, ["10.61.0.30"],
     datetime(2036, 3, 31, 22, tzinfo=timezone.utc), False, "erin may not reach build-3.ci.corp.internal:22; ask your bastion admin for a grant"),
    ("contractor-expiring.toml", "erin", "10.60.0.20", 22, None, datetime(2036, 7, 1, tzinfo=timezone.utc),
     False, "access for erin expired at 2036-06-30T23:59:59Z; ask your bastion admin to renew it"),
    ("ipv6.toml", "frank", "fd00:1::1234", 22, None, NOW, True, "groups.v6ops.allow: [fd00:1::/64]:22"),
    ("ipv6.toml", "frank", "fd00:1::1234", 443, None, NOW, False, "frank may not reach [fd00:1::1234]:443; ask your bastion admin for a grant"),
    ("ipv6.toml", "frank", "fd00:2:0:5::1", 443, None, NOW, True, "groups.v6ops.allow: [fd00:2::/48]:22,443"),
    ("ipv6.toml", "frank", "fd00:2:0:ff::1", 22, None, NOW, False, "groups.v6ops.deny: [fd00:2:0:ff::/64]"),
    ("ipv6.toml", "frank", "[fd00:3::10]", 6379, None, NOW, True, "groups.v6ops.allow: [fd00:3::10]:*"),
    ("ipv6.toml", "frank", "::1", 22, None, NOW, False, "::1 is a loopback address"),
    ("ipv6.toml", "frank", "10.70.0.5", 22, None, NOW, True, "users.frank.allow: 10.70.0.5:22"),
]


def test_every_example_has_decision_cases():
    assert {case[0] for case in CASES} == {f.name for f in FILES}


@pytest.mark.parametrize(("file", "user", "host", "port", "addresses", "now", "allowed", "said"), CASES)
def test_example_decisions(file, user, host, port, addresses, now, allowed, said):
    policy = load_policy_file(POLICIES / file)
    parsed = parse_host(host)
    resolved = tuple(ip_address(a) for a in addresses) if addresses else (parsed,)
    decision = evaluate(policy, NetGuard(), AccessRequest(user, parsed, resolved, port, now))
    assert decision.allowed is allowed
    if allowed or decision.rule is not None:
        assert decision.rule == said
    else:
        assert decision.reason == said
