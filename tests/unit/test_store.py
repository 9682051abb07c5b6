"""Store: users, keys and policy in SQLite; `apply_policy` is all or nothing."""

import subprocess

import pytest

from bastion.errors import StoreError
from bastion.policy.file import parse_policy
from bastion.store.sqlite import Store, parse_public_keys


@pytest.fixture
def key_lines(tmp_path):
    lines = []
    for name in ("one", "two"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test", "-f", tmp_path / name],
                       check=True)
        lines.append((tmp_path / f"{name}.pub").read_text().strip())
    return lines


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "bastion.db")
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
    assert store.add_user("alice", keys) == keys
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


def test_apply_upserts_and_bumps_version(store):
    version_before = store.policy_version()
    store.apply_policy(parse_policy('[groups.ops]\nallow = ["10.20.0.0/16"]\n[users.alice]\ngroups = ["ops"]\n'))
    store.apply_policy(parse_policy('[users.bob]\nallow = ["10.1.1.1:80"]\n'))
    version, policy = store.load_policy()
    assert version > version_before
    assert set(policy.users) == {"alice", "bob"} and set(policy.groups) == {"ops"}
    assert policy.users["alice"].groups == ("ops",)


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


def test_keys_in_policy_replace_stored_keys(store, key_lines):
    store.add_user("alice", parse_public_keys(key_lines[0]))
    store.apply_policy(parse_policy(f'[users.alice]\nkeys = ["{key_lines[1]}"]\n'))
    assert [k.comment for k in store.user_keys("alice")] == ["two@test"]
    store.apply_policy(parse_policy('[users.alice]\nallow = ["10.0.0.1"]\n'))  # no keys: kept
    assert [k.comment for k in store.user_keys("alice")] == ["two@test"]
