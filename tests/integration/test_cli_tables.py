"""Tables as an admin reads them at 80 columns: every line fits, no fingerprint, session id or time is split
across lines, times read 2026-12-01T23:23:23Z everywhere, and `--json` keeps the stored values. Through the real
CLI on a real home: a live server with a real OpenSSH session for `sessions list`, the real AuditLog for audit."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_audit_cli import write_session
from tests.integration.test_serve_loopback import start_serve

ROOT = Path(__file__).resolve().parents[2]
SSH = shutil.which("ssh")
HUMAN_TIME = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")
OTHER_TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+|[+-]\d\d:\d\d)")


def bastion(home: Path, *args: str, columns: int | None = 80) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    proc = subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def assert_fits(output: str, whole: list[str], width: int = 80) -> None:
    """No line wider than `width`; each of `whole` that the table shows at all is on one line; one time form."""
    lines = output.splitlines()
    assert lines and max(len(line) for line in lines) <= width, output
    for token in whole:
        pieces = [token[:n] for n in range(8, len(token))]  # a start of it at the end of a line: it was split
        assert not any(line.rstrip().endswith(piece) for line in lines for piece in pieces), (token, output)
    assert not OTHER_TIME.search(output), output


@pytest.fixture
def audit_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    assert bastion(home, "init", "--listen", "127.0.0.1:0").returncode == 0
    for n in range(3):
        write_session(home / "bastion.db", f"{n:03d}f55ba64e00", "alice")
    return home


def test_audit_tables_fit_80_columns_without_splitting_an_id(audit_home: Path) -> None:
    listed = json.loads(bastion(audit_home, "audit", "sessions", "--json").stdout)
    ids = [row["id"] for row in listed]
    assert len(ids) == 3 and all("." in row["started_at"] for row in listed)  # --json: stored milliseconds
    for table in ("auth", "sessions", "channels", "listeners", "stats"):
        out = bastion(audit_home, "audit", table).stdout
        assert_fits(out, ids + ["SHA256:k"])
        if table != "stats":
            assert HUMAN_TIME.search(out), out
    for shown in (bastion(audit_home, "audit", "sessions").stdout, bastion(audit_home, "audit", "listeners").stdout):
        assert all(any(i in line for line in shown.splitlines()) for i in ids), shown
    timeline = bastion(audit_home, "audit", "show", ids[0]).stdout
    assert_fits(timeline, [ids[0]])
    assert len(HUMAN_TIME.findall(timeline)) >= 5, timeline


def test_wide_terminal_and_pipe_show_every_column(audit_home: Path) -> None:
    wide = bastion(audit_home, "audit", "channels", columns=250).stdout
    header = wide.splitlines()[0].split()
    assert header[:3] == ["id", "session_id", "user"] and "close_reason" in header and "left out" not in wide
    piped = bastion(audit_home, "audit", "channels", columns=None).stdout  # no COLUMNS, not a terminal
    assert len(piped.splitlines()) == 1 + 6, piped  # natural width: one line per row, for grep
    narrow = bastion(audit_home, "audit", "channels").stdout
    assert "(left out at 80 columns: id, session_id, kind" in narrow, narrow
    assert narrow.splitlines()[0].split() == ["user", "target", "decision", "reason", "opened_at"], narrow


@pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")
def test_sessions_list_and_user_list_at_80_columns(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert bastion(home, "init", "--listen", "127.0.0.1:0").returncode == 0
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@a-rather-long-laptop-name.example",
                    "-f", key], check=True)
    bastion(home, "user", "add", "alice", "--key", f"{key}.pub")
    policy = tmp_path / "policy.toml"
    policy.write_text('[users.alice]\nallow = ["127.0.0.2:7"]\n')
    bastion(home, "policy", "apply", str(policy))
    server, port = start_serve(home)
    host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    client = subprocess.Popen([SSH, "-F", "/dev/null", "-N", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
                               "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "alice@127.0.0.1"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (live := json.loads(bastion(home, "sessions", "list", "--json").stdout)):
            assert time.monotonic() < deadline and client.poll() is None, client.stderr
            time.sleep(0.2)
        session_id = live[0]["id"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+00:00", live[0]["started_at"])  # --json as before
        listed = bastion(home, "sessions", "list").stdout
        assert_fits(listed, [session_id])
        assert session_id in listed and HUMAN_TIME.search(listed), listed
        fingerprint = json.loads(bastion(home, "user", "list", "--json").stdout)[0]["keys"][0]["fingerprint"]
        users = bastion(home, "user", "list").stdout
        assert_fits(users, [fingerprint])
        assert fingerprint in users, users
    finally:
        client.kill()
        client.wait()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
