"""Issue #20 item 9: the smaller slips an admin met on the way, each through the real CLI on a real home."""

from __future__ import annotations

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
