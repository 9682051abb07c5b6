"""Scenarios: paramiko as a second, independent client opening direct-tcpip channels itself."""

from __future__ import annotations

import paramiko
import pytest

from testbed import ECHO_PORT, LAN_ADDR, paramiko_connect

pytestmark = [pytest.mark.netns, pytest.mark.both_paths]  # tunnels: on the fast path and asyncssh as shipped (.ci/run)

ADMINISTRATIVELY_PROHIBITED = 1  # RFC 4254 section 5.1


@pytest.fixture
def client(testbed, bastion, keys):
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    yield client
    client.close()


def test_direct_tcpip_allowed(client, bastion):
    channel = client.get_transport().open_channel("direct-tcpip", (LAN_ADDR, ECHO_PORT), ("127.0.0.1", 0),
                                                  timeout=10)
    channel.settimeout(10)
    channel.sendall(b"paramiko says hi")
    channel.shutdown_write()
    received = b""
    while chunk := channel.recv(4096):
        received += chunk
    channel.close()
    assert received == b"paramiko says hi"

    rows = bastion.wait_audit("channels", lambda rows: rows and rows[0]["closed_at"], "channel closed")
    assert (rows[0]["decision"], rows[0]["target_ip"], rows[0]["target_port"]) == ("allow", LAN_ADDR, ECHO_PORT)


@pytest.mark.parametrize("target", [("169.254.169.254", 80), ("meta.evil.test", 80), ("10.99.0.3", 22)],
                         ids=lambda t: f"{t[0]}:{t[1]}")
def test_direct_tcpip_refused(client, bastion, target):
    with pytest.raises(paramiko.ChannelException) as raised:
        client.get_transport().open_channel("direct-tcpip", target, ("127.0.0.1", 0), timeout=10)
    assert raised.value.code == ADMINISTRATIVELY_PROHIBITED, raised.value
    assert raised.value.text, "the refusal carries a reason"

    # the connection survives a refusal: the next, allowed, channel still opens
    channel = client.get_transport().open_channel("direct-tcpip", (LAN_ADDR, ECHO_PORT), ("127.0.0.1", 0),
                                                  timeout=10)
    channel.close()

    rows = bastion.wait_audit("channels", lambda rows: len(rows) == 2, "two channel rows")
    [refused] = [r for r in rows if r["target_host"] == target[0]]
    assert refused["decision"] == "deny" and refused["reason"], refused
