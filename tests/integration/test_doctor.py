"""`bastion doctor` finds each broken condition it claims to find, on a real home: each test breaks one thing in
a healthy install and checks that doctor names it (and only a problem makes the command exit 1)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.cli.main import app
from bastion.config import Config
from bastion.ops.doctor import (
    NOTE,
    OK,
    PROBLEM,
    WARNING,
    Finding,
    Listener,
    clock_finding,
    port_finding,
    run_checks,
)
from bastion.policy.file import parse_policy
from bastion.service.home import initialize
from bastion.store.sqlite import Store, parse_public_keys

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz alice@example"
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_NET_BIND_SERVICE = 1, 2, 10
PR_CAPBSET_DROP = 24


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A healthy install, made once (host key generation is slow); each test breaks a copy."""
    home = tmp_path_factory.mktemp("doctor") / "home"
    initialize(Config(home=home, listen="127.0.0.1:2222"))
    store = Store(home / "bastion.db")
    store.add_user("alice", parse_public_keys(KEY))
    store.apply_policy(parse_policy('[users.alice]\nallow = ["10.1.2.0/24:22"]\n'))
    store.close()
    return home


@pytest.fixture
def home(template: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(template, home)  # copy2 keeps the 0700/0600 modes
    set_listen(home, f"127.0.0.1:{free_port()}")
    return home


def set_listen(home: Path, listen: str) -> None:
    config = home / "config.toml"
    lines = [f'listen = "{listen}"' if line.startswith("listen =") else line for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")


def check(home: Path) -> list[Finding]:
    return run_checks(home, environ={})


def named(findings: list[Finding], check_name: str, level: str) -> list[str]:
    return [f.message for f in findings if f.check == check_name and f.level == level]


def levels(findings: list[Finding]) -> set[str]:
    return {f.level for f in findings}


def apply(home: Path, policy: str) -> None:
    store = Store(home / "bastion.db")
    try:
        store.apply_policy(parse_policy(policy))
    finally:
        store.close()


# ---- a healthy install, through the real command ---------------------------------------------------------


def test_healthy_install_passes_and_a_problem_exits_1(home):
    runner = CliRunner()
    result = runner.invoke(app, ["--home", str(home), "doctor"], env={"BASTION_HOME": None})
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("all checks passed"), result.stdout

    (home / "ssh_host_rsa_key").chmod(0o644)
    result = runner.invoke(app, ["--home", str(home), "doctor", "--json"], env={"BASTION_HOME": None})
    assert result.exit_code == 1, result.output
    [problem] = [f for f in json.loads(result.stdout) if f["level"] == PROBLEM]
    assert problem["check"] == "host key" and problem["fix"] == f"run: chmod 600 {home / 'ssh_host_rsa_key'}"


# ---- one broken thing at a time --------------------------------------------------------------------------


def test_broken_config(home):
    (home / "config.toml").write_text('listen = "127.0.0.1:2222"\nlisten_adress = "x"\n')
    [finding] = check(home)
    assert (finding.check, finding.level) == ("config", PROBLEM)
    assert "unknown key 'listen_adress'" in finding.message


def test_home_writable_by_others(home):
    home.chmod(0o777)
    assert named(check(home), "home", PROBLEM) == [f"{home} is writable by others (mode 777)"]


def test_port_in_use_names_the_process_holding_it(home):
    with socket.create_server(("127.0.0.1", 0)) as holder:
        set_listen(home, f"127.0.0.1:{holder.getsockname()[1]}")
        [message] = named(check(home), "port", PROBLEM)
    assert "is already in use by " in message and f"pid {os.getpid()}" in message


@pytest.mark.parametrize("error, holder, level, words", [
    (None, None, OK, "can be bound"),
    (OSError(errno.EADDRINUSE, "in use"), Listener(7, "sshd (pid 7): sshd -D", None), PROBLEM, "move the host's own sshd"),
    (OSError(errno.EADDRINUSE, "in use"), Listener(8, "bastion (pid 8)", Path("/var/lib/bastion")), OK, "already running"),
    (OSError(errno.EADDRINUSE, "in use"), Listener(9, "bastion (pid 9)", Path("/elsewhere")), PROBLEM, "in use by bastion"),
    (OSError(errno.EACCES, "denied"), None, PROBLEM, "CAP_NET_BIND_SERVICE"),
    (OSError(errno.EADDRNOTAVAIL, "not here"), None, PROBLEM, "not an address of this machine"),
])
def test_port_finding_table(error, holder, level, words):
    finding = port_finding("0.0.0.0", 22, error, holder, Path("/var/lib/bastion"))
    assert finding.level == level and words in finding.message + finding.fix, finding


def test_host_key_readable_by_others_missing_or_damaged(home):
    (home / "ssh_host_ed25519_key").chmod(0o640)
    (home / "ssh_host_rsa_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n")
    problems = named(check(home), "host key", PROBLEM)
    assert problems[0] == f"{home / 'ssh_host_ed25519_key'} is readable by others (mode 640); the server refuses to start"
    assert problems[1].startswith(f"{home / 'ssh_host_rsa_key'} cannot be loaded")

    for key in home.glob("ssh_host_*"):
        key.unlink()
    assert named(check(home), "host key", PROBLEM) == [f"no host key in {home}"]


def test_database_missing_damaged_or_too_new(home):
    database = home / "bastion.db"
    database.write_bytes(b"this is not a database" * 100)
    [message] = named(check(home), "database", PROBLEM)
    assert message.startswith(f"{database} is damaged: file is not a database"), message

    database.unlink()
    assert named(check(home), "database", PROBLEM) == [f"{database} does not exist"]


def test_database_schema_newer_than_this_bastion(home):
    with sqlite3.connect(home / "bastion.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    [message] = named(check(home), "database", PROBLEM)
    assert "schema version 99 is newer than this bastion" in message


def test_without_privileges_a_low_port_and_a_read_only_database(home):
    # 1. what an unprivileged user meets: a database it may not write, a port below 1024
    database = home / "bastion.db"
    database.chmod(0o400)
    set_listen(home, "127.0.0.1:1")
    low_ports_privileged = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() != "0"
    if os.geteuid() == 0:  # root passes both; without these capabilities it is held to the rules
        findings = doctor_without_capabilities(home, [CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_NET_BIND_SERVICE])
    else:
        findings = [f.as_dict() for f in check(home)]

    # 2. the database is named, with the fix
    [problem] = [f for f in findings if f["check"] == "database" and f["level"] == PROBLEM]
    assert problem["message"] == f"{database} is not writable: attempt to write a readonly database", problem
    assert "chown -R bastion:" in problem["fix"]

    # 3. so is the port, where the host reserves low ports (net.ipv4.ip_unprivileged_port_start > 1)
    [port] = [f for f in findings if f["check"] == "port"]
    if low_ports_privileged:
        assert port["level"] == PROBLEM and "CAP_NET_BIND_SERVICE" in port["fix"], port


def test_clock_behind_the_audit_log(home):
    future = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    with sqlite3.connect(home / "bastion.db") as conn:
        conn.execute("INSERT INTO auth (time, user, client_ip, client_port, method, key_fingerprint, result, reason) "
                     "VALUES (?, 'alice', '10.0.0.5', 50000, 'publickey', NULL, 'success', 'key accepted')", [future])
    [message] = named(check(home), "clock", PROBLEM)
    assert message.startswith("the clock is 2 days behind the newest audit row"), message


@pytest.mark.parametrize("now, newest, level", [
    (datetime(2026, 5, 1, tzinfo=UTC), None, OK),
    (datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 1, 0, 4, tzinfo=UTC), OK),  # within the 5 minutes allowed
    (datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 1, 1, 0, tzinfo=UTC), PROBLEM),
    (datetime(2001, 1, 1, tzinfo=UTC), None, PROBLEM),  # a machine that booted without a clock
])
def test_clock_finding_table(now, newest, level):
    assert clock_finding(now, newest).level == level


def test_empty_policy(home):
    store = Store(home / "bastion.db")
    store.remove_user("alice")
    store.close()
    assert named(check(home), "policy", WARNING) == ["there are no users, so nobody can log in"]

    apply(home, "[users.bob]\n")
    findings = check(home)
    assert named(findings, "policy", WARNING) == ["no user may reach anything: the policy grants nothing"]
    assert levels(findings) - {NOTE} == {OK, WARNING}  # warnings do not fail the check (a note: fast path off)


def test_users_without_keys(home):
    apply(home, '[users.bob]\nallow = ["10.1.2.3"]\n')
    assert named(check(home), "users", WARNING) == ["user bob has no public key and cannot log in"]


def test_grants_the_guard_refuses_anyway(home):
    apply(home, '[users.alice]\nallow = ["10.1.2.0/24:22", "8.8.8.0/24:22", "127.0.0.1:22", "10.0.0.0/7:22", '
                '"169.254.169.254:80", "db.corp.internal:5432"]\n')
    assert named(check(home), "grants", WARNING) == [
        "users.alice.allow: 8.8.8.0/24:22 is outside the internal networks; the guard refuses it whatever the policy says",
        "users.alice.allow: 127.0.0.1:22 is a loopback address; the guard refuses it whatever the policy says",
        "users.alice.allow: 10.0.0.0/7:22 is partly outside the internal networks; the guard refuses it whatever the "
        "policy says",
        "users.alice.allow: 169.254.169.254:80 is not in an internal network; the guard refuses it whatever the "
        "policy says",
    ]


# ---- running doctor with fewer privileges ----------------------------------------------------------------


def doctor_without_capabilities(home: Path, capabilities: list[int]) -> list[dict]:
    """`bastion doctor --json` in a child that dropped `capabilities` from its bounding set before exec, so that
    even as root it cannot, e.g., write a file mode 0400 or bind a port below 1024."""
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for capability in capabilities:
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    result = subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), "doctor", "--json"],
                            preexec_fn=drop, capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)
