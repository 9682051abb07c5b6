"""Scenarios: a user jumps through the bastion to real targets (ProxyJump, -L, -D, by name) and it is audited."""

from __future__ import annotations

import hashlib
import shutil
import socket

import pytest

from testbed import (
    ECHO_PORT,
    GW_ADDR,
    HTTP_FILE,
    HTTP_PAYLOAD,
    HTTP_PORT,
    LAN_ADDR,
    SSH_PORT,
    free_port,
    http_get,
    recv_all,
    socks5_connect,
)

pytestmark = [pytest.mark.netns, pytest.mark.both_paths]  # tunnels: on the fast path and asyncssh as shipped (.ci/run)


def channels_to(rows, host, port):
    return [r for r in rows if r["target_host"] == host and r["target_port"] == port]


def test_proxyjump_to_real_sshd_runs_a_command_and_is_audited(testbed, bastion, ssh, keys):
    # 1. ssh -J alice@bastion root@10.99.0.2 echo hello
    result = ssh.run("-J", "alice@bastion", "target", "echo hello from the target")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello from the target\n"

    # 2. one successful publickey login for alice, with her key's fingerprint
    auth = bastion.wait_audit("auth", lambda rows: any(r["result"] == "success" for r in rows), "auth success")
    success = [r for r in auth if r["result"] == "success"]
    assert len(success) == 1, auth
    assert success[0]["user"] == "alice"
    assert success[0]["key_fingerprint"] == keys["alice"].fingerprint
    assert success[0]["client_ip"] == GW_ADDR

    # 3. the session, ended once the client went away
    sessions = bastion.wait_audit("sessions", lambda rows: rows and all(r["ended_at"] for r in rows), "session end")
    assert len(sessions) == 1, sessions
    session = sessions[0]
    assert session["user"] == "alice"
    assert session["key_fingerprint"] == keys["alice"].fingerprint
    assert session["client_version"].startswith("SSH-2.0-OpenSSH"), session
    assert session["bytes_up"] > 0 and session["bytes_down"] > 0, session

    # 4. one allowed direct-tcpip channel to the target's sshd, closed, with bytes both ways
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel close")
    assert len(channels) == 1, channels
    channel = channels[0]
    assert channel["kind"] == "direct-tcpip"
    assert channel["session_id"] == session["id"]
    assert channel["user"] == "alice"
    assert (channel["target_host"], channel["target_ip"], channel["target_port"]) == (LAN_ADDR, LAN_ADDR, SSH_PORT)
    assert channel["decision"] == "allow"
    assert channel["rule"], channel
    assert channel["bytes_up"] > 0 and channel["bytes_down"] > 0, channel


def test_local_forward_to_echo_and_http(testbed, bastion, ssh):
    # 1. ssh -L to the echo server: bytes come back unchanged
    port = free_port(testbed.gw)
    with ssh.forward("-L", f"127.0.0.1:{port}:{LAN_ADDR}:{ECHO_PORT}", port):
        with testbed.connect(testbed.gw, ("127.0.0.1", port)) as sock:
            message = b"ping through the bastion\n" * 1000
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == message

    # 2. ssh -L to the HTTP server: the file arrives byte for byte
    port = free_port(testbed.gw)
    with ssh.forward("-L", f"127.0.0.1:{port}:{LAN_ADDR}:{HTTP_PORT}", port):
        with testbed.connect(testbed.gw, ("127.0.0.1", port)) as sock:
            body = http_get(sock, LAN_ADDR, f"/{HTTP_FILE}")
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(HTTP_PAYLOAD).hexdigest()

    channels = bastion.wait_audit("channels", lambda rows: len(rows) == 2 and all(r["closed_at"] for r in rows),
                                  "two closed channels")
    assert {(r["target_port"], r["decision"]) for r in channels} == {(ECHO_PORT, "allow"), (HTTP_PORT, "allow")}
    http = channels_to(channels, LAN_ADDR, HTTP_PORT)[0]
    assert http["bytes_down"] >= len(HTTP_PAYLOAD), http


def test_socks_forward_by_name_to_http(testbed, bastion, ssh):
    # 1. ssh -D; the client hands the *name* to the bastion, which resolves it in gw (hosts file)
    port = free_port(testbed.gw)
    url = f"http://web.corp.internal:{HTTP_PORT}/{HTTP_FILE}"
    with ssh.forward("-D", f"127.0.0.1:{port}", port):
        if shutil.which("curl"):
            result = testbed.run(testbed.gw, ["curl", "-sS", "--fail", "--max-time", "10", "--noproxy", "",
                                              "--socks5-hostname", f"127.0.0.1:{port}", url], timeout=15)
            assert result.returncode == 0, result.stderr.decode()
            body = result.stdout
        else:
            with socks5_connect(testbed.gw, port, "web.corp.internal", HTTP_PORT) as sock:
                body = http_get(sock, "web.corp.internal", f"/{HTTP_FILE}")
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(HTTP_PAYLOAD).hexdigest()

    # 2. audited with the name asked for and the address used
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel close")
    [channel] = channels_to(channels, "web.corp.internal", HTTP_PORT)
    assert (channel["decision"], channel["target_ip"]) == ("allow", LAN_ADDR), channel


def test_stdio_forward_by_name(testbed, bastion, ssh):
    # ssh -W db.corp.internal:7 — granted by name, resolved through gw's hosts file to 10.99.0.2
    result = ssh.stdio_forward("db.corp.internal", ECHO_PORT, input=b"by name\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"by name\n"

    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel close")
    [channel] = channels_to(channels, "db.corp.internal", ECHO_PORT)
    assert (channel["decision"], channel["target_ip"]) == ("allow", LAN_ADDR), channel
    assert channel["bytes_up"] == channel["bytes_down"] == len(b"by name\n"), channel
