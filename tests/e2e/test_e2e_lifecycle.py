"""Scenarios: the server process dies (SIGKILL) or is asked to stop (SIGTERM) with a tunnel open."""

from __future__ import annotations

import os
import select
import signal
import subprocess

import pytest

from testbed import ECHO_PORT, LAN_ADDR

pytestmark = pytest.mark.netns


class OpenTunnel:
    """`ssh -W 10.99.0.2:7 bastion` with stdin held open: a live channel until someone else closes it."""

    def __init__(self, ssh):
        read_end, self._write_end = os.pipe()
        self.proc = ssh.popen("-W", f"{LAN_ADDR}:{ECHO_PORT}", "bastion", stdin=read_end)
        os.close(read_end)

    def send(self, data: bytes) -> None:
        os.write(self._write_end, data)

    def receive(self, size: int, timeout: float = 10) -> bytes:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"nothing came back through the tunnel within {timeout}s")
        return os.read(self.proc.stdout.fileno(), size)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        os.close(self._write_end)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def tunnel(bastion, ssh):
    tunnel = OpenTunnel(ssh)
    try:
        tunnel.send(b"are you there\n")
        assert tunnel.receive(100) == b"are you there\n"
        bastion.wait_audit("channels", lambda rows: len(rows) == 1, "the tunnel's channel row")
        yield tunnel
    finally:
        tunnel.close()


def test_sigkill_then_restart_marks_open_rows_crashed(bastion, tunnel):
    # 1. the server dies with a session and a channel open
    assert bastion.stop(signal.SIGKILL, timeout=10) == -signal.SIGKILL
    assert tunnel.wait(10) != 0  # the client sees the connection drop

    # 2. restart on the same home; the open rows from before are closed as "crash"
    bastion.start()
    sessions = bastion.audit("sessions")
    assert len(sessions) == 1, sessions
    assert sessions[0]["ended_at"], sessions
    assert sessions[0]["end_reason"] == "crash", sessions
    channels = bastion.audit("channels")
    assert len(channels) == 1 and channels[0]["closed_at"], channels


def test_sigterm_stops_gracefully_and_ends_the_open_session(bastion, tunnel):
    # 1. SIGTERM with a tunnel open: exit 0 within a few seconds
    try:
        code = bastion.stop(signal.SIGTERM, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("bastion serve did not exit within 10s of SIGTERM with one tunnel open")
    assert code == 0, bastion.log()[-3000:]
    assert tunnel.wait(10) is not None

    # 2. the session and channel rows were closed by the server itself, not by crash recovery
    sessions = bastion.audit("sessions")
    assert len(sessions) == 1, sessions
    assert sessions[0]["ended_at"], sessions
    assert sessions[0]["end_reason"] not in (None, "", "crash"), sessions
    channels = bastion.audit("channels")
    assert len(channels) == 1 and channels[0]["closed_at"], channels

    # 3. nothing is left listening: a new server can take the port at once
    bastion.start()
