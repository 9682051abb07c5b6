"""`serve --workers 2`: two processes on one port share the load, the audit log (one hash chain, two
writers), the control socket view (`sessions list/kill` see every worker), and stop together on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from testbed import ECHO_PORT, LAN_ADDR, kill_group, stop_process, wait_until

pytestmark = pytest.mark.netns


def test_two_workers_serve_share_the_audit_and_stop_together(bastion, ssh):
    bastion.stop()
    bastion.set_config(workers=2)
    bastion.start()
    wait_until(lambda: bastion.log().count("listening on") >= 3, 10, "both workers listening")  # 1st run + 2
    for n in range(8):  # short sessions, spread over both workers by the kernel
        assert ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"%d\n" % n).stdout == b"%d\n" % n
    held = []
    try:
        for _ in range(6):
            proc = ssh.popen("-W", f"{LAN_ADDR}:{ECHO_PORT}", "bastion", stdin=subprocess.PIPE)
            proc.stdin.write(b"x\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"x\n"
            held.append(proc)
        sessions = json.loads(bastion.cli("sessions", "list", "--json").stdout)
        assert len(sessions) == 6
        assert {s["worker"] for s in sessions} <= {0, 1}
        bastion.cli("sessions", "kill", "--user", "alice")
        for proc in held:
            proc.wait(timeout=10)
    finally:
        for proc in held:
            stop_process(proc)
            kill_group(proc)
    assert bastion.stop(signal.SIGTERM, timeout=20) == 0
    workers = {line.split("(worker ")[1][0] for line in bastion.log().splitlines() if "(worker " in line}
    assert workers == {"0", "1"}
    rows = bastion.audit("sessions")
    assert len(rows) >= 14 and all(r["ended_at"] for r in rows)
    assert sum(r["end_reason"].startswith("killed by") for r in rows) == 6
    verify = bastion.cli("audit", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_dead_worker_takes_the_server_down_for_a_clean_restart(bastion):
    bastion.stop()
    bastion.set_config(workers=2)
    bastion.start()
    wait_until(lambda: bastion.log().count("(worker ") >= 2, 10, "both workers listening")
    worker_pids = [int(line.split("pid ")[1].split(")")[0]) for line in bastion.log().splitlines()
                   if "(worker " in line and "listening on" in line]
    assert len(worker_pids) == 2
    os.kill(worker_pids[0], signal.SIGKILL)
    code = bastion.wait(timeout=20)
    assert code != 0  # the service manager sees a failure and restarts the whole server
    assert "stopping the others" in bastion.log()
