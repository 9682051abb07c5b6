"""Scenarios: the gateway on each event loop it offers moves every byte, including the ones a target
sends before the channel is confirmed.

uvloop starts reading a new connection even when the protocol paused it in `connection_made`; the relay
once dropped what arrived in that gap, and 1 GiB target→client transfers came up megabytes short. The
close-first target writes 512 KiB the moment it accepts, so those bytes are in flight before the bastion
confirms the channel.
"""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest

from testbed import CLOSE_FIRST_PAYLOAD, CLOSE_FIRST_PORT, ECHO_PORT, LAN_ADDR, free_port, recv_all

pytestmark = pytest.mark.netns

RUNS = 6


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_bastion(request, bastion):  # type: ignore[no-untyped-def]
    """The standard bastion, restarted on the event loop named by the parameter."""
    bastion.stop()
    bastion.set_config(event_loop=request.param)
    bastion.start()
    return bastion, request.param


def test_startup_log_names_the_event_loop(loop_bastion):
    bastion, loop = loop_bastion
    assert f"event loop {loop})" in bastion.log()


def test_target_bytes_sent_before_the_channel_opens_all_arrive(loop_bastion, ssh):
    bastion, _ = loop_bastion
    expected = hashlib.sha256(CLOSE_FIRST_PAYLOAD).hexdigest()
    for run in range(RUNS):
        result = ssh.stdio_forward(LAN_ADDR, CLOSE_FIRST_PORT, timeout=10)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        got = result.stdout
        assert hashlib.sha256(got).hexdigest() == expected, \
            f"run {run + 1}: got {len(got)} of {len(CLOSE_FIRST_PAYLOAD)} bytes or other content"
    rows = bastion.wait_audit("channels", lambda rows: len(rows) == RUNS and all(r["closed_at"] for r in rows),
                              f"{RUNS} closed channels")
    assert [r["bytes_down"] for r in rows] == [len(CLOSE_FIRST_PAYLOAD)] * RUNS


def test_local_forward_echoes_both_ways(loop_bastion, ssh, testbed):
    bastion, _ = loop_bastion
    port = free_port(testbed.gw)
    message = hashlib.sha256(b"loops").digest() * 40_000  # 1.28 MB, several windows
    with ssh.forward("-L", f"127.0.0.1:{port}:{LAN_ADDR}:{ECHO_PORT}", port):
        with testbed.connect(testbed.gw, ("127.0.0.1", port), timeout=10) as sock:
            def send() -> None:  # beside the reads, so neither side's buffers can fill up and stall
                sock.sendall(message)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            got = recv_all(sock)
            sender.join()
            assert got == message
    rows = bastion.wait_audit("channels", lambda rows: len(rows) == 1 and rows[0]["closed_at"], "closed channel")
    assert (rows[0]["bytes_up"], rows[0]["bytes_down"]) == (len(message), len(message))
