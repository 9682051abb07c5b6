"""Scenarios: one server per home. A second `bastion serve` on the same home (on another port, where nothing stops
it from binding) refuses to start and names the running server's pid, leaving the first one its control socket and
its open audit rows; once the first dies, even by SIGKILL, a new server starts."""

from __future__ import annotations

import json
import signal

import pytest

from testbed import GW_ADDR, paramiko_connect, wait_until

pytestmark = pytest.mark.netns

OTHER_LISTEN = f"{GW_ADDR}:2222"


def second_serve(bastion, *args: str):
    return bastion.cli("serve", "--listen", OTHER_LISTEN, *args, check=False, timeout=20)


def live_users(bastion) -> list[str]:
    return [row["user"] for row in json.loads(bastion.cli("sessions", "list", "--json").stdout)]


def test_a_second_serve_is_refused_and_a_killed_one_is_replaced(testbed, bastion, keys):
    # 1. the first server has a live session
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    try:
        bastion.wait_audit("sessions", lambda rows: len(rows) == 1, "alice's session row")
        # 2. a second serve on the same home: refused at once, naming the first one's pid
        refused = second_serve(bastion)
        assert refused.returncode != 0
        stderr = refused.stderr.decode()
        assert f"already running (pid {bastion.proc.pid})" in stderr and "Traceback" not in stderr
        assert len(stderr.splitlines()) == 1, stderr
        # 3. the first still owns its control socket and its rows: the session is listed, and still open
        assert live_users(bastion) == ["alice"]
        [session] = bastion.audit("sessions")
        assert session["ended_at"] is None, "the refused server must not have recovered the live one's rows"
    finally:
        client.close()

    # 4. the first dies without cleaning up (lock file and control socket stay behind); a new server starts
    assert bastion.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (bastion.home / "serve.lock").exists() and (bastion.home / "control.sock").is_socket()
    bastion.start()
    assert live_users(bastion) == []  # the new server answers on the control socket
    assert (bastion.home / "serve.lock").read_text() == f"{bastion.proc.pid}\n"


def test_with_workers_the_supervisor_holds_the_lock_for_all_of_them(bastion):
    bastion.stop()
    bastion.set_config(workers=2)
    bastion.start()
    wait_until(lambda: bastion.log().count("(worker ") >= 2, 10, "both workers listening")
    refused = second_serve(bastion, "--workers", "1")
    assert refused.returncode != 0
    assert f"already running (pid {bastion.proc.pid})" in refused.stderr.decode()
    assert live_users(bastion) == []  # both workers still answer
    assert bastion.stop(signal.SIGTERM, timeout=20) == 0


def test_a_refused_serve_touches_nothing_in_the_home(bastion):
    # initialize() would write a missing config.toml (and migrate the database): it must not run at all
    (bastion.home / "config.toml").rename(bastion.home.parent / "config.toml.aside")
    refused = second_serve(bastion)
    assert refused.returncode != 0 and b"already running" in refused.stderr
    assert not (bastion.home / "config.toml").exists(), "the refused serve initialized the live home"
    (bastion.home.parent / "config.toml.aside").rename(bastion.home / "config.toml")
