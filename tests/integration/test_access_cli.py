"""Issue #20 item 4: `bastion access USER`, `bastion access --to HOST[:PORT]` and `policy check`'s exit codes,
through the real CLI on a real home with a real policy applied."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

POLICY = """
[groups.ops]
allow = ["10.20.0.0/16:22", "*.db.corp.internal:5432",
         { target = "10.30.0.0/24:5432", expires = 2036-07-01T00:00:00Z }]
deny = ["10.20.0.9"]
listen = ["127.0.0.1:9000-9099"]

[users.alice]
groups = ["ops"]
allow = ["10.1.2.3:22,8000-8100", "127.0.0.1:22"]
deny = ["10.20.0.0/28:22"]
expires = 2037-01-31T00:00:00Z

[users.bob]
allow = ["10.1.2.3"]

[users.carol]
groups = ["ops"]
"""


def bastion(home: Path, *args: str, code: int = 0, columns: int = 200) -> subprocess.CompletedProcess:
    """The real CLI in its own process; wide by default, so each table row is one line."""
    result = subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": str(columns)})
    assert result.returncode == code, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    home = tmp / "home"
    bastion(home, "init", "--listen", "127.0.0.1:0")
    (tmp / "policy.toml").write_text(POLICY)
    bastion(home, "policy", "apply", str(tmp / "policy.toml"))
    return home


def rows(stdout: str, first: set[str]) -> list[list[str]]:
    """The table rows whose first cell is in `first`, as their non-empty cells: cells are apart by two spaces or a
    rule ('│'), words inside a cell by one (wide enough, with COLUMNS=200, that no row wraps)."""
    found = []
    for line in stdout.splitlines():
        cells = [cell for cell in re.split(r"\s{2,}", line.replace("│", "  ").strip()) if cell]
        if cells and cells[0] in first:
            found.append(cells)
    return found


KINDS = {"open", "listen"}
USERS = {"alice", "bob", "carol"}


def test_what_a_user_can_reach_as_a_table(home):
    result = bastion(home, "access", "alice")
    assert "what alice can reach" in result.stdout
    assert rows(result.stdout, KINDS) == [
        ["open", "10.1.2.3", "22,8000-8100", "user alice", "2037-01-31T00:00:00Z"],
        ["open", "127.0.0.1", "22", "user alice", "2037-01-31T00:00:00Z",
         "all: 127.0.0.1 is a loopback address (network guard)"],
        ["open", "10.20.0.0/16", "22", "group ops", "2037-01-31T00:00:00Z",
         "users.alice.deny: 10.20.0.0/28:22; groups.ops.deny: 10.20.0.9"],
        ["open", "*.db.corp.internal", "5432", "group ops", "2037-01-31T00:00:00Z"],
        ["open", "10.30.0.0/24", "5432", "group ops", "2036-07-01T00:00:00Z"],  # the grant's own, earlier expiry
        ["listen", "127.0.0.1", "9000-9099", "group ops", "2037-01-31T00:00:00Z"],
    ]
    assert rows(bastion(home, "access", "bob").stdout, KINDS) == [["open", "10.1.2.3", "22", "user bob", "never"]]


def test_at_80_columns_the_denies_stay_and_no_address_is_split(home):
    shown = bastion(home, "access", "alice", columns=80).stdout
    assert max(len(line.rstrip()) for line in shown.splitlines()) <= 80
    words = shown.split()
    assert {"users.alice.deny:", "10.20.0.0/28:22;", "groups.ops.deny:", "10.20.0.9", "10.20.0.0/16"} <= set(words)
    assert "left out at 80 columns: expires" in shown  # the expiry goes before the denies do


def test_what_a_user_can_reach_as_json(home):
    data = json.loads(bastion(home, "access", "alice", "--json").stdout)
    assert (data["user"], data["expires"], data["expired"]) == ("alice", "2037-01-31T00:00:00Z", False)
    grant = next(g for g in data["grants"] if g["rule"] == "10.20.0.0/16:22")
    assert grant == {"kind": "open", "target": "10.20.0.0/16", "ports": "22", "via": "group ops",
                     "rule": "10.20.0.0/16:22", "expires": "2037-01-31T00:00:00Z",
                     "except": ["users.alice.deny: 10.20.0.0/28:22", "groups.ops.deny: 10.20.0.9"],
                     "guard_refuses": None}
    assert [g["guard_refuses"] for g in data["grants"] if g["target"] == "127.0.0.1"] == [
        "127.0.0.1 is a loopback address", None]  # the open grant; a listen bind is not the guard's


def test_who_can_reach_a_target_at_a_port(home):
    result = bastion(home, "access", "--to", "10.20.1.1:22")
    assert rows(result.stdout, USERS) == [
        ["alice", "granted", "22", "groups.ops.allow: 10.20.0.0/16:22", "2037-01-31T00:00:00Z"],
        ["carol", "granted", "22", "groups.ops.allow: 10.20.0.0/16:22", "never"],
    ]
    data = json.loads(bastion(home, "access", "--to", "10.30.0.7:5432", "--json").stdout)
    assert data["target"] == "10.30.0.7" and data["port"] == 5432 and data["refused"] is None
    assert [(r["user"], r["allowed"], r["rule"], r["expires"]) for r in data["reach"]] == [
        ("alice", True, "groups.ops.allow: 10.30.0.0/24:5432", "2036-07-01T00:00:00Z"),
        ("carol", True, "groups.ops.allow: 10.30.0.0/24:5432", "2036-07-01T00:00:00Z"),
    ]


def test_a_deny_cutting_in_is_shown_with_the_reason(home):
    result = bastion(home, "access", "--to", "10.20.0.9:22")
    assert "nobody can reach 10.20.0.9:22" in result.stdout
    assert rows(result.stdout, USERS) == [
        ["alice", "refused", "22", "users.alice.deny: 10.20.0.0/28:22", "10.20.0.9:22 is denied by policy"],
        ["carol", "refused", "22", "groups.ops.deny: 10.20.0.9", "10.20.0.9:22 is denied by policy"],
    ]
    # every port at once: alice's own deny takes 22 off the /16 near .0, the group's deny every port of .9
    data = json.loads(bastion(home, "access", "--to", "10.20.0.5", "--json").stdout)
    assert data["port"] is None
    assert [(r["user"], r["allowed"], r["ports"], r["rule"]) for r in data["reach"]] == [
        ("alice", False, "22", "users.alice.deny: 10.20.0.0/28:22"),
        ("carol", True, "22", "groups.ops.allow: 10.20.0.0/16:22"),
    ]


def test_who_can_reach_an_address_at_any_port(home):
    result = bastion(home, "access", "--to", "10.1.2.3")
    assert rows(result.stdout, USERS) == [
        ["alice", "granted", "22,8000-8100", "users.alice.allow: 10.1.2.3:22,8000-8100", "2037-01-31T00:00:00Z"],
        ["bob", "granted", "22", "users.bob.allow: 10.1.2.3", "never"],
    ]


@pytest.mark.parametrize("target", ["127.0.0.1:22", "localhost:22", "[::1]:22"])
def test_a_loopback_target_is_reachable_by_nobody_and_the_guard_says_why_once(home, target):
    result = bastion(home, "access", "--to", target)
    assert result.stdout.count("is a loopback address") == 1
    assert "nobody can reach" in result.stdout and "network guard" in result.stdout
    assert rows(result.stdout, USERS) == []  # no table of users
    data = json.loads(bastion(home, "access", "--to", target, "--json").stdout)
    assert data["refused"].endswith("is a loopback address") and data["reach"] == []


def test_nobody_and_nothing_are_said_in_a_line(home, tmp_path):
    assert bastion(home, "access", "--to", "10.99.0.1:22").stdout == "nobody can reach 10.99.0.1:22\n"
    other = tmp_path / "other"
    bastion(other, "init", "--listen", "127.0.0.1:0")
    (tmp_path / "p.toml").write_text('[users.erin]\nallow = ["10.1.2.3"]\nexpires = 2020-01-01T00:00:00Z\n'
                                     '[users.dave]\n')
    bastion(other, "policy", "apply", str(tmp_path / "p.toml"))
    assert bastion(other, "access", "erin").stdout == "erin can reach nothing: access expired at 2020-01-01T00:00:00Z\n"
    assert bastion(other, "access", "dave").stdout == "dave can reach nothing: no unexpired grants\n"
    assert json.loads(bastion(other, "access", "dave", "--json").stdout)["grants"] == []


@pytest.mark.parametrize(("args", "message"), [
    (["access"], "give a USER or --to HOST[:PORT], not both or neither"),
    (["access", "alice", "--to", "10.1.2.3"], "give a USER or --to HOST[:PORT], not both or neither"),
    (["access", "mallory"], "no user named 'mallory' in the policy"),
    (["access", "--to", "10.1.2.3:70000"], "port 70000 is out of range 1-65535"),
    (["access", "--to", "10.1.2.3:0"], "port 0 is out of range 1-65535"),
    (["access", "--to", "10.1.2.3:abc"], "port must be a number from 1 to 65535"),
    (["access", "--to", "10.1.2.3:"], "port must be a number from 1 to 65535"),
    (["access", "--to", "bad host"], "target host contains whitespace"),
    (["access", "--to", "[::1"], "target host has unbalanced brackets"),
    (["access", "--to", "no-such-host.invalid:22"], "cannot resolve no-such-host.invalid"),
    (["policy", "check", "alice", "10.1.2.3", "0"], "port 0 is out of range 1-65535"),
    (["policy", "check", "alice", "10.1.2.3", "70000"], "port 70000 is out of range 1-65535"),
    (["policy", "check", "alice", "10.1.2.3", "abc"], "port must be a number from 1 to 65535"),
    (["policy", "check", "mallory", "10.1.2.3", "22"], "no user named 'mallory' in the policy"),
    (["policy", "check", "alice", "bad host", "22"], "target host contains whitespace"),
])
def test_bad_input_is_one_line_and_exit_2(home, args, message):
    result = bastion(home, *args, code=2)
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_policy_check_still_grants_with_0_and_refuses_with_1(home):
    assert bastion(home, "policy", "check", "alice", "10.1.2.3", "8050").stdout.startswith("granted: ")
    assert bastion(home, "policy", "check", "bob", "10.1.2.3").stdout.startswith("granted: ")
    assert "denied by policy" in bastion(home, "policy", "check", "alice", "10.20.0.9", "22", code=1).stdout
    assert "loopback" in bastion(home, "policy", "check", "alice", "127.0.0.1", "22", code=1).stdout
    assert "may not reach" in bastion(home, "policy", "check", "bob", "10.1.2.3", "23", code=1).stdout


def test_access_help_has_examples(home):
    result = bastion(home, "access", "--help")
    assert "bastion access alice" in result.stdout and "bastion access --to db.internal:5432" in result.stdout
