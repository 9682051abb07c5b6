"""policy/diff.py: what a policy change does to each user's effective access."""

from __future__ import annotations

from datetime import datetime, timezone

from bastion.policy.diff import policy_diff
from bastion.policy.file import parse_policy

NOW = datetime(2026, 12, 2, tzinfo=timezone.utc)


def diff(before: str, after: str):
    return policy_diff(parse_policy(before), parse_policy(after), NOW)


def test_no_change_is_empty():
    text = '[groups.ops]\nallow = ["10.0.0.0/8:22"]\n[users.alice]\ngroups = ["ops"]\n'
    result = diff(text, text)
    assert result.empty and not result.removes_access


def test_removed_group_and_grant_remove_access():
    result = diff('[groups.ops]\nallow = ["10.0.0.0/8:22"]\n[users.alice]\ngroups = ["ops"]\nallow = ["10.1.1.1"]\n',
                  '[users.alice]\nallow = ["10.1.1.1"]\n')
    assert result.removes_access and result.groups_removed == ("ops",)
    assert [(c.user, c.before.rule, c.after) for c in result.changes] == [("alice", "10.0.0.0/8:22", None)]


def test_a_new_deny_or_an_earlier_end_narrows_and_a_new_grant_does_not_remove():
    before = '[users.alice]\nallow = ["10.0.0.0/8:22"]\n'
    narrowed = diff(before, '[users.alice]\nallow = ["10.0.0.0/8:22"]\ndeny = ["10.0.0.9"]\n')
    assert narrowed.removes_access and narrowed.changes[0].after.except_ == ("users.alice.deny: 10.0.0.9",)
    ending = diff(before, '[users.alice]\nallow = ["10.0.0.0/8:22"]\nexpires = 2027-01-01T00:00:00Z\n')
    assert ending.removes_access
    widened = diff(before, '[users.alice]\nallow = ["10.0.0.0/8:22", "10.2.2.2:443"]\n')
    assert not widened.removes_access and [c.after.rule for c in widened.changes] == ["10.2.2.2:443"]
    assert diff('[users.alice]\nallow = ["10.0.0.0/8:22"]\nexpires = 2027-01-01T00:00:00Z\n', before).changes[0] \
        .removes_access is False  # a later end (here: none) gives access


def test_new_users_are_listed():
    result = diff("", '[users.bob]\nallow = ["10.1.1.1"]\n')
    assert result.users_added == ("bob",) and not result.removes_access


def test_login_requirements_switched_on_count_as_removing_access():
    on = diff('[groups.ops]\nallow = ["10.0.0.0/8:22"]\n[users.alice]\ngroups = ["ops"]\n',
              '[groups.ops]\nallow = ["10.0.0.0/8:22"]\nrequire_totp = true\n[users.alice]\ngroups = ["ops"]\n')
    assert on.requirements == (("group ops", "require_totp", True),) and on.removes_access and not on.empty
    off = diff('[users.alice]\nrequire_security_key = true\n', '[users.alice]\n')
    assert off.requirements == (("user alice", "require_security_key", False),) and not off.removes_access
