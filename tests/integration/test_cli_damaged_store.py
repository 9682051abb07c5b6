"""A damaged database met by the store's own commands (user, policy, ssh-config) is a problem found: exit 1 with
one line naming the database, the same as the audit commands; usage errors stay exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bastion(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


@pytest.fixture(scope="module")
def garbage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("garbage") / "home"
    assert bastion(home, "init", "--listen", "127.0.0.1:2222").returncode == 0
    for leftover in home.glob("bastion.db-*"):
        leftover.unlink()
    (home / "bastion.db").write_bytes(os.urandom(4096) * 4)
    return home


@pytest.mark.parametrize("args", [["user", "list"], ["policy", "show"], ["user", "remove", "alice"],
                                  ["ssh-config", "alice", "--host", "bastion.example"]])
def test_a_damaged_database_is_exit_1_for_store_commands(garbage: Path, args: list[str]) -> None:
    proc = bastion(garbage, *args)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {garbage / 'bastion.db'}: ") and len(proc.stderr.splitlines()) == 1
    assert "not a database" in proc.stderr and "Traceback" not in proc.stderr


def test_a_usage_error_on_a_damaged_home_is_still_exit_2(garbage: Path) -> None:
    proc = bastion(garbage, "user", "list", "--no-such-flag")
    assert proc.returncode == 2, proc.stderr
