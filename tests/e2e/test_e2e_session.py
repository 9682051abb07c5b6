"""Scenarios: what a plain `ssh alice@bastion` gets — a short note, no shell, no commands, no agent, no X11."""

from __future__ import annotations

import re

import paramiko
import pytest
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from testbed import GW_ADDR, LAN_ADDR, clean_env, paramiko_connect

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("tty", [[], ["-tt"]], ids=["no-tty", "tty"])
def test_login_prints_user_and_targets_then_exits(bastion, ssh, tty):
    result = ssh.run(*tty, "bastion", timeout=10)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (out, result.stderr.decode(errors="replace"))
    assert "alice" in out, out
    assert LAN_ADDR in out, f"expected alice's targets in the note:\n{out}"
    assert len(out.splitlines()) < 60, "a short note, not a dump"
    # an example command, if the note gives one, must not point at a target the bastion always refuses
    for example in re.findall(r"ssh -J \S+ (\S+)", out):
        target = example.rsplit("@", 1)[-1]
        assert target not in (GW_ADDR, "127.0.0.1", "localhost"), f"the note suggests {example}, which is refused"


def test_remote_command_is_refused(bastion, ssh, tmp_path):
    marker = tmp_path / "ran"
    result = ssh.run("bastion", f"touch {marker}", timeout=10)
    assert result.returncode != 0, result.stdout.decode(errors="replace")
    assert not marker.exists()


def test_x11_forwarding_is_refused_to_openssh(bastion, ssh):
    # with DISPLAY set and no xauth data, OpenSSH sends x11-req with fake data and reports the server's answer
    result = ssh.run("-X", "bastion", env=clean_env({"DISPLAY": ":97"}), timeout=10)
    assert "X11 forwarding request failed" in result.stderr.decode(errors="replace"), result.stderr


def channel_request_accepted(channel: paramiko.Channel, kind: str, *fields: bool | str | int) -> bool:
    """Send channel request `kind` with want_reply=True and return the server's answer (bounded wait).

    Hand-built because paramiko's request_forward_agent() sends want_reply=False, like OpenSSH, which leaves
    the answer invisible, and paramiko's own waits have no timeout.
    """
    message = Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string(kind)
    message.add_boolean(True)
    for field in fields:
        if isinstance(field, bool):
            message.add_boolean(field)
        elif isinstance(field, int):
            message.add_int(field)
        else:
            message.add_string(field)
    channel._event_pending()
    channel.transport._send_user_message(message)
    assert channel.event.wait(10), f"no answer to {kind} within 10s"
    return channel.event_ready  # set by CHANNEL_SUCCESS; CHANNEL_FAILURE closes the channel instead


REQUESTS = {
    "agent": ("auth-agent-req@openssh.com",),
    "x11": ("x11-req", False, "MIT-MAGIC-COOKIE-1", "0123456789abcdef0123456789abcdef", 0),
}


@pytest.mark.parametrize("request_name", sorted(REQUESTS))
def test_agent_and_x11_requests_are_refused(testbed, bastion, keys, request_name):
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    try:
        channel = client.get_transport().open_session(timeout=10)
        assert not channel_request_accepted(channel, *REQUESTS[request_name])
    finally:
        client.close()
