"""Fail closed (issue #5): while the audit store cannot be written, new sessions and channels are refused
with a clear reason; when it recovers, service resumes. The fault is real: another process holds SQLite's
write lock on the server's database past the server's busy timeout."""

from __future__ import annotations

import sqlite3
import time

import pytest

from testbed import ECHO_PORT, LAN_ADDR, wait_until

pytestmark = pytest.mark.netns


def test_locked_audit_store_refuses_logins_until_it_recovers(bastion, ssh):
    assert ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"before\n").stdout == b"before\n"
    blocker = sqlite3.connect(bastion.home / "bastion.db", timeout=1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the server's writer now waits, then fails with "database is locked"
    try:
        started = time.monotonic()
        first = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"during\n", timeout=40)
        assert first.returncode == 255 and first.stdout == b""
        assert b"audit log unavailable" in first.stderr, first.stderr
        # the server now knows: the next login is refused at once, without waiting for the lock
        started = time.monotonic()
        second = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"during\n", timeout=40)
        assert time.monotonic() - started < 8
        assert second.returncode == 255 and b"audit log unavailable" in second.stderr
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    def works() -> bool:
        return ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"after\n").stdout == b"after\n"

    wait_until(works, 40, "service back once the store is writable")
    rows = bastion.wait_audit("auth", lambda rows: any(r["reason"] == "audit log unavailable" for r in rows),
                              "the refusals, written once the store recovered")
    assert rows[-1]["result"] == "success"
    assert "audit write failed" in bastion.log() and "audit log writable again" in bastion.log()
