"""Issue #20 item 9: the smaller slips an admin met on the way, each through the real CLI on a real home."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


def bastion(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    assert bastion(home, "init", "--listen", "127.0.0.1:0").returncode == 0
    return home


def test_serve_with_a_listen_address_without_port_says_it_once(home):
    result = bastion(home, "serve", "--listen", "127.0.0.1")
    assert result.returncode == 2
    assert "listen listen" not in result.stderr
    assert "option --listen: listen address '127.0.0.1' must be HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_on_a_home_that_is_a_file_says_so(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory\n")
    result = bastion(home, "doctor")
    assert result.returncode == 1
    assert f"{home} is not a directory" in result.stdout
    assert "fix the named key" not in result.stdout


def test_backup_counts_listener_rows_as_audit_rows(home, tmp_path):
    with sqlite3.connect(home / "bastion.db") as conn:
        conn.execute("INSERT INTO auth (time, user, client_ip, client_port, method, key_fingerprint, result, reason)"
                     " VALUES ('2026-12-02T00:00:00Z', 'alice', '10.0.0.1', 5555, 'publickey', NULL, 'success', '')")
        conn.execute("INSERT INTO listeners (session_id, user, listen_host, listen_port, requested_port, decision,"
                     " rule, reason, opened_at) VALUES ('s1', 'alice', '127.0.0.1', 8080, 8080, 'allow', NULL, '',"
                     " '2026-12-02T00:00:00Z')")
    conn.close()
    result = bastion(home, "backup", str(tmp_path / "copy.db"))
    assert result.returncode == 0, result.stderr
    assert "2 audit rows" in result.stdout + result.stderr


EXPIRED_POLICY = """
[groups.ops]
allow = ["10.20.0.0/16:22", { target = "10.20.9.9:22", expires = 2020-01-01T00:00:00Z }]

[users.alice]
groups = ["ops"]
allow = [{ target = "10.9.9.9:22", expires = 2020-06-01T12:00:00Z }, "10.1.2.3:22"]
listen = [{ target = "127.0.0.1:9000", expires = 2020-02-01T00:00:00Z }]

[users.erin]
allow = ["10.60.0.0/24:22"]
expires = 2020-06-30T23:59:59Z

[users.bob]
allow = [{ target = "10.1.2.4:22", expires = 2099-01-01T00:00:00Z }]
expires = 2099-01-01T00:00:00Z
"""

EXPIRED_LINES = [
    "user erin expired at 2020-06-30T23:59:59Z",
    "users.alice.allow: 10.9.9.9:22 expired at 2020-06-01T12:00:00Z",
    "users.alice.listen: 127.0.0.1:9000 expired at 2020-02-01T00:00:00Z",
    "groups.ops.allow: 10.20.9.9:22 expired at 2020-01-01T00:00:00Z",
]


def test_policy_apply_and_doctor_warn_about_expired_entries(home, tmp_path):
    policy = tmp_path / "expired.toml"
    policy.write_text(EXPIRED_POLICY)
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    warnings = [line for line in applied.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {line}; it grants nothing" for line in EXPIRED_LINES]
    doctor = bastion(home, "doctor")
    for line in EXPIRED_LINES:
        assert sum(line in out for out in doctor.stdout.splitlines()) == 1, doctor.stdout
    assert "bob" not in applied.stderr and "users.bob" not in doctor.stdout


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[2] / "policies").glob("*.toml")),
                         ids=lambda p: p.name)
def test_example_policies_have_not_expired(home, example):
    applied = bastion(home, "policy", "apply", str(example))
    assert applied.returncode == 0, applied.stderr
    assert "warning:" not in applied.stderr


def test_readme_first_steps_run_as_written_without_bastion_on_the_path(tmp_path):
    """The First steps block, in a checkout-like directory (.venv, policies/, alice.pub), with a PATH that has
    no bastion on it: the block itself must say where the install put the command. `serve` is left out."""
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = readme.split("## First steps", 1)[1].split("```", 2)[1]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("bastion serve")]
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    (tmp_path / "policies").symlink_to(root / "policies")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@test", "-f", str(tmp_path / "alice")],
                   check=True)
    script = "set -e\n" + "\n".join(line.split("  #", 1)[0] for line in commands) + "\n"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "granted: alice -> 10.1.2.3:22" in result.stdout, result.stdout
    # #20 item 1: applying the example policy used to replace the key just added with the example's own
    listed = subprocess.run([str(tmp_path / ".venv/bin/bastion"), "--home", str(tmp_path / "demo"), "user", "list",
                             "--json"], capture_output=True, text=True, timeout=60)
    users = {user["name"]: user for user in json.loads(listed.stdout)}
    assert [key["comment"] for key in users["alice"]["keys"]] == ["alice@test"]


def test_commands_named_in_the_example_policies_exist(home):
    """The comments in policies/*.toml name `bastion GROUP COMMAND …`; each must have help (exist)."""
    root = Path(__file__).resolve().parents[2]
    named = set()
    for path in (root / "policies").glob("*.toml"):
        named |= set(re.findall(r"`bastion (\w+) ([\w-]+)", path.read_text()))
        named |= set(re.findall(r"^# Apply with:\s+bastion (\w+) ([\w-]+)", path.read_text(), re.M))
    assert ("user", "add") in named
    for group, command in sorted(named):
        result = bastion(home, group, command, "--help")
        assert result.returncode == 0, f"bastion {group} {command}: {result.stderr}"


def test_init_again_with_another_listen_says_the_config_keeps_its_own(home):
    again = bastion(home, "init", "--listen", "127.0.0.1:2222")
    assert again.returncode == 0
    assert "already initialized; nothing changed" in again.stdout
    assert f"warning: listen stays 127.0.0.1:0 as set in {home / 'config.toml'}" in again.stderr
    assert 'listen = "127.0.0.1:0"' in (home / "config.toml").read_text()  # never rewritten by init
    same = bastion(home, "init", "--listen", "127.0.0.1:0")
    assert same.returncode == 0 and "warning" not in same.stderr
