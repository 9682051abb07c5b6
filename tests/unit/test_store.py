"""Store: users, keys and policy in SQLite and PostgreSQL (#22); `apply_policy` is all or nothing."""

import subprocess

import pytest

from bastion.errors import StoreError
from bastion.policy.file import parse_policy
from bastion.policy.model import UserPolicy
from bastion.store.sqlite import Store, parse_public_keys
from testbed.pg_store import backend_location, pg_store_url, pg_url, postgres  # noqa: F401  (fixtures)


@pytest.fixture
def key_lines(tmp_path):
    lines = []
    for name in ("one", "two"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test", "-f", tmp_path / name],
                       check=True)
        lines.append((tmp_path / f"{name}.pub").read_text().strip())
    return lines


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """Every test runs on both backends (#22): the same Store methods on SQLite and on a real PostgreSQL."""
    store = Store(backend_location(request, tmp_path))
    yield store
    store.close()


def test_parse_public_keys_reads_every_line_and_fingerprints(key_lines):
    keys = parse_public_keys("# comment\n\n" + "\n".join(key_lines), "keys.pub")
    assert [k.comment for k in keys] == ["one@test", "two@test"]
    assert all(k.fingerprint.startswith("SHA256:") and k.key_type == "ssh-ed25519" for k in keys)


@pytest.mark.parametrize("text", ["", "# only a comment", "ssh-ed25519 notbase64!", "hello world"])
def test_parse_public_keys_rejects_non_keys(text):
    with pytest.raises(StoreError):
        parse_public_keys(text, "bad.pub")


def test_add_user_is_idempotent_and_lists_keys(store, key_lines):
    keys = parse_public_keys(key_lines[0])
    assert store.add_user("alice", keys) == [(keys[0], "added")]
    assert store.add_user("alice", keys) == []
    [alice] = store.list_users()
    assert alice["name"] == "alice" and [k["fingerprint"] for k in alice["keys"]] == [keys[0].fingerprint]
    assert store.user_keys("alice") == keys
    assert store.user_keys("nobody") == []


@pytest.mark.parametrize("name", ["Alice", "", "a b", "x" * 40, "../etc"])
def test_add_user_rejects_bad_names(store, key_lines, name):
    with pytest.raises(StoreError, match="invalid user name"):
        store.add_user(name, parse_public_keys(key_lines[0]))


def test_remove_user_removes_keys_and_policy(store, key_lines):
    store.add_user("alice", parse_public_keys(key_lines[0]))
    store.apply_policy(parse_policy('[users.alice]\nallow = ["10.0.0.1"]\n'))
    store.remove_user("alice")
    assert store.user_keys("alice") == []
    assert "alice" not in store.load_policy()[1].users
    with pytest.raises(StoreError, match="no user named"):
        store.remove_user("alice")


def test_apply_is_the_declared_state_and_bumps_version(store):
    version_before = store.policy_version()
    store.apply_policy(parse_policy('[groups.ops]\nallow = ["10.20.0.0/16"]\n[users.alice]\ngroups = ["ops"]\n'))
    store.apply_policy(parse_policy('[users.bob]\nallow = ["10.1.1.1:80"]\n'))
    version, policy = store.load_policy()
    assert version > version_before
    # alice is not in the second file: she stays (with her keys) but has no grants; ops is gone
    assert set(policy.users) == {"alice", "bob"} and set(policy.groups) == set()
    assert policy.users["alice"] == UserPolicy("alice")


def test_apply_with_unknown_group_changes_nothing(store):
    store.apply_policy(parse_policy('[users.alice]\nallow = ["10.0.0.1"]\n'))
    before = store.load_policy()
    with pytest.raises(StoreError, match="unknown group"):
        store.apply_policy(parse_policy('[users.alice]\ngroups = ["ghosts"]\n[users.bob]\nallow = ["10.0.0.2"]\n'))
    assert store.load_policy() == before


def test_apply_with_bad_key_changes_nothing(store, key_lines):
    store.add_user("alice", parse_public_keys(key_lines[0]))
    before_keys = store.user_keys("alice")
    text = f'[users.alice]\nkeys = ["{key_lines[1]}", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIQ== broken"]\n'
    with pytest.raises(StoreError):
        store.apply_policy(parse_policy(text))
    assert store.user_keys("alice") == before_keys


def test_policy_apply_never_removes_a_key_it_did_not_add(store, key_lines):
    """#20 item 1: `user add alice`, then a policy file with keys for alice, used to replace her key."""
    store.add_user("alice", parse_public_keys(key_lines[0]))
    store.apply_policy(parse_policy(f'[users.alice]\nkeys = ["{key_lines[1]}"]\n'))
    assert sorted(k.comment for k in store.user_keys("alice")) == ["one@test", "two@test"]
    plan = store.plan_policy(parse_policy('[users.alice]\nallow = ["10.0.0.1"]\n'))
    assert [(user, key.comment) for user, key in plan.keys_removed] == [("alice", "two@test")]
    store.apply_policy(parse_policy('[users.alice]\nallow = ["10.0.0.1"]\n'))
    # the key the policy file added goes with it; the one added by hand stays
    assert [k.comment for k in store.user_keys("alice")] == ["one@test"]
    assert [k.source for k in store.user_keys("alice")] == ["cli"]


def test_a_key_added_by_hand_and_listed_in_a_policy_stays_when_the_policy_drops_it(store, key_lines):
    store.add_user("alice", parse_public_keys(key_lines[0]))
    store.apply_policy(parse_policy(f'[users.alice]\nkeys = ["{key_lines[0]}"]\n'))
    assert store.plan_policy(parse_policy("")).keys_removed == []
    store.apply_policy(parse_policy(""))
    assert [k.comment for k in store.user_keys("alice")] == ["one@test"]


def test_apply_refuses_a_plan_made_against_an_older_store(store, key_lines):
    plan = store.plan_policy(parse_policy('[users.alice]\nallow = ["10.0.0.1"]\n'))
    store.add_user("bob", parse_public_keys(key_lines[0]))
    with pytest.raises(StoreError, match="changed since the plan"):
        store.apply_policy(parse_policy('[users.alice]\nallow = ["10.0.0.1"]\n'), expected_version=plan.version)
    assert "alice" not in store.load_policy()[1].users
