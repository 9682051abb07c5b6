"""Hostile load and bad input (issue #5): limits before and after authentication, and junk on the wire.
Each test starts its own bastion with the limit under test set low, then checks the client's view, the
audit log, and that the server still serves a good client afterwards."""

from __future__ import annotations

import socket
import subprocess
import time

import paramiko
import pytest

from testbed import (
    DEFAULT_POLICY, ECHO_PORT, GW_ADDR, LAN_ADDR, PREFIX_LEN, SshClient, generate_key, kill_group, netns_connect,
    paramiko_connect, run, stop_process, wait_until,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def limited(make_bastion, keys):
    """A bastion factory: `limited(**config)` returns a running bastion with alice and the default policy."""
    def start(**config):
        bastion = make_bastion()
        bastion.init(**{"connect_timeout": 2, **config})
        bastion.add_user("alice", keys["alice"])
        bastion.apply_policy(DEFAULT_POLICY)
        bastion.start()
        return bastion
    return start


def good_client_works(testbed, bastion, keys, tmp_path) -> bool:
    client = SshClient(testbed, bastion, tmp_path / "good", keys["alice"])
    return client.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"ok\n").stdout == b"ok\n"


def raw(testbed, bastion) -> socket.socket:
    return netns_connect(testbed.gw, (bastion.host, bastion.port), timeout=10)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes the connection within `within` seconds (reading and discarding its bytes)."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


def test_login_grace_time_closes_a_silent_client(limited, testbed, keys, tmp_path):
    bastion = limited(login_grace_seconds=1)
    with raw(testbed, bastion) as sock:
        sock.sendall(b"SSH-2.0-slowloris\r\n")  # then nothing: a stalled handshake
        assert closed_by_server(sock, 5)
    rows = bastion.wait_audit("auth", lambda rows: rows, "login timeout row")
    assert rows[-1]["reason"] == "login grace time exceeded"
    assert good_client_works(testbed, bastion, keys, tmp_path)


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 70000, b"SSH-2.0-x\r\n" + b"\xff" * 40000])
def test_garbage_on_the_wire_is_dropped_and_the_server_lives(limited, testbed, keys, tmp_path, junk):
    bastion = limited()
    with raw(testbed, bastion) as sock:
        try:
            sock.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_by_server(sock, 10)
    assert good_client_works(testbed, bastion, keys, tmp_path)
    assert bastion.proc.poll() is None
    assert "Traceback" not in bastion.log()


def test_max_auth_tries_disconnects(limited, testbed, keys, tmp_path):
    bastion = limited(max_auth_tries=2)
    strangers = [generate_key(tmp_path / f"k{n}", f"k{n}@test") for n in range(4)]
    client = SshClient(testbed, bastion, tmp_path / "stranger", strangers[0])
    extra = [arg for key in strangers[1:] for arg in ("-i", str(key.path))]
    result = client.run(*extra, "bastion", "true")
    assert result.returncode == 255
    assert b"Too many authentication failures" in result.stderr
    rows = bastion.wait_audit("auth", lambda rows: any("too many" in r["reason"] for r in rows), "too-many row")
    assert sum(r["reason"] == "key not accepted" for r in rows) == 2


def test_repeated_failures_get_the_source_penalized_and_audited_once(limited, testbed, keys, tmp_path):
    bastion = limited(penalty_threshold=3, penalty_seconds=30)
    stranger = SshClient(testbed, bastion, tmp_path / "stranger", keys["stranger"])
    for _ in range(3):
        assert stranger.run("bastion", "true").returncode == 255
    # now even alice, from the same address, is refused before the SSH banner
    for _ in range(5):
        with raw(testbed, bastion) as sock:
            assert closed_by_server(sock, 5)
    assert not good_client_works(testbed, bastion, keys, tmp_path)
    rows = bastion.wait_audit("auth", lambda rows: any("source refused" in r["reason"] for r in rows), "penalty")
    assert sum("source refused" in r["reason"] for r in rows) == 1  # once per burst, not per packet


NAT_ADDR = "10.99.0.9"  # a second source address on gw's veth: the NAT many users share


def test_exempt_source_is_never_penalized_nor_dropped_by_the_startup_limit(limited, testbed, keys, tmp_path):
    """penalty_exempt (#20): failures from inside the list start no penalty and the startup limit lets it in,
    while a source outside the list is dropped and penalized as before."""
    bastion = limited(penalty_threshold=2, max_startups="1", penalty_exempt=[f"{NAT_ADDR}/32"])
    listing = run(["ip", "-n", testbed.gw, "-o", "-4", "addr", "show"], check=True).stdout.decode()
    device = next(line.split()[1] for line in listing.splitlines() if f"{GW_ADDR}/{PREFIX_LEN}" in line)
    testbed.ip(testbed.gw, "addr", "add", f"{NAT_ADDR}/{PREFIX_LEN}", "dev", device)
    try:
        stranger = SshClient(testbed, bastion, tmp_path / "stranger", keys["stranger"])
        alice = SshClient(testbed, bastion, tmp_path / "alice", keys["alice"])
        holder = raw(testbed, bastion)  # one unauthenticated connection from outside: the startup limit is full
        try:
            holder.settimeout(5)
            assert holder.recv(100).startswith(b"SSH-2.0-")
            with raw(testbed, bastion) as sock:
                assert closed_by_server(sock, 5)  # outside the list: dropped
            for _ in range(4):  # twice the threshold, from the NAT
                assert stranger.run("-b", NAT_ADDR, "bastion", "true").returncode == 255
            inside = alice.run("-b", NAT_ADDR, "-W", f"{LAN_ADDR}:{ECHO_PORT}", "bastion", input=b"ok\n")
            assert inside.stdout == b"ok\n", inside.stderr
        finally:
            holder.close()
        for _ in range(2):
            assert stranger.run("bastion", "true").returncode == 255
        assert not good_client_works(testbed, bastion, keys, tmp_path)  # outside the list: penalized
        rows = bastion.wait_audit("auth", lambda rows: any("source refused" in r["reason"] for r in rows), "penalty")
        refused = [r["client_ip"] for r in rows if "source refused" in r["reason"]]
        assert refused == [GW_ADDR]
        assert any(r["client_ip"] == NAT_ADDR and r["result"] == "success" for r in rows)
    finally:
        testbed.ip(testbed.gw, "addr", "del", f"{NAT_ADDR}/{PREFIX_LEN}", "dev", device)


def test_startup_limit_drops_past_full_and_audits_once(limited, testbed, keys, tmp_path):
    bastion = limited(max_startups="2")
    holders = [raw(testbed, bastion) for _ in range(2)]
    try:
        for sock in holders:
            sock.settimeout(5)
            assert sock.recv(100).startswith(b"SSH-2.0-")
        for _ in range(5):
            with raw(testbed, bastion) as sock:
                assert closed_by_server(sock, 5)
        rows = bastion.wait_audit("auth", lambda rows: any("startup limit" in r["reason"] for r in rows), "drop")
        assert sum("startup limit" in r["reason"] for r in rows) == 1
    finally:
        for sock in holders:
            sock.close()
    wait_until(lambda: good_client_works(testbed, bastion, keys, tmp_path), 10, "accepting again")


def test_per_user_session_cap(limited, testbed, keys, tmp_path):
    bastion = limited(max_sessions_per_user=1)
    ssh = SshClient(testbed, bastion, tmp_path / "c", keys["alice"])
    first = ssh.popen("-W", f"{LAN_ADDR}:{ECHO_PORT}", "bastion", stdin=subprocess.PIPE)
    try:
        first.stdin.write(b"x\n")
        first.stdin.flush()
        assert first.stdout.readline() == b"x\n"
        second = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"y\n")
        assert second.returncode == 255 and b"too many concurrent sessions for alice" in second.stderr
    finally:
        stop_process(first)
        kill_group(first)


def test_per_user_channel_cap(limited, testbed, keys):
    bastion = limited(max_channels_per_user=1)
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    try:
        transport = client.get_transport()
        first = transport.open_channel("direct-tcpip", (LAN_ADDR, ECHO_PORT), ("127.0.0.1", 0), timeout=10)
        with pytest.raises(paramiko.ChannelException) as refused:
            transport.open_channel("direct-tcpip", (LAN_ADDR, ECHO_PORT), ("127.0.0.1", 0), timeout=10)
        assert refused.value.code == 1  # administratively prohibited; paramiko drops the reason text
        rows = bastion.wait_audit("channels", lambda rows: len(rows) == 2, "the refusal row")
        assert rows[-1]["reason"].startswith("too many open channels for alice (limit 1)")
        first.close()
        wait_until(lambda: transport.open_channel("direct-tcpip", (LAN_ADDR, ECHO_PORT), ("127.0.0.1", 0),
                                                  timeout=10), 10, "a channel once the first closed")
    finally:
        client.close()


def test_unused_session_is_closed(limited, testbed, keys, tmp_path):
    bastion = limited(unused_timeout_seconds=1)
    ssh = SshClient(testbed, bastion, tmp_path / "c", keys["alice"])
    started = time.monotonic()
    result = ssh.run("-N", "bastion", timeout=15)
    assert time.monotonic() - started < 8
    assert b"no open channel for 1s" in result.stderr


def test_maximum_session_length(limited, testbed, keys, tmp_path):
    bastion = limited(max_session_seconds=2)
    ssh = SshClient(testbed, bastion, tmp_path / "c", keys["alice"])
    proc = ssh.popen("-W", f"{LAN_ADDR}:{ECHO_PORT}", "bastion", stdin=subprocess.PIPE)
    try:
        proc.wait(timeout=10)
        rows = bastion.wait_audit("sessions", lambda rows: rows and rows[-1]["ended_at"], "session end")
        assert rows[-1]["end_reason"] == "maximum session length reached"
    finally:
        stop_process(proc)
        kill_group(proc)


def test_black_holed_target_is_refused_in_seconds(limited, testbed, keys, tmp_path):
    bastion = limited(connect_timeout=1)
    bastion.apply_policy(DEFAULT_POLICY.replace('allow = ["10.99.0.0/24:22"', 'allow = ["10.99.0.0/24:22,4444"'))
    ssh = SshClient(testbed, bastion, tmp_path / "c", keys["alice"])
    started = time.monotonic()
    result = ssh.stdio_forward("10.99.0.77", 4444, input=b"")  # nobody has this address: no ARP answer
    assert time.monotonic() - started < 6
    assert b"connect failed" in result.stderr and b"10.99.0.77:4444" in result.stderr


@pytest.mark.parametrize(
    "host, port, reason",
    [
        ("10.99.0.2\x00.evil", ECHO_PORT, "target host"),
        ("db.corp.internal\r\nX", ECHO_PORT, "target host"),
        ("a" * 10_000, ECHO_PORT, "target host"),
        ("dЬ.corp.internal", ECHO_PORT, "target host"),  # a Cyrillic look-alike
        (LAN_ADDR, 0, "port"),
        (LAN_ADDR, 65536, "port"),
    ],
)
def test_hostile_targets_are_refused_with_a_reason_and_audited(limited, testbed, keys, host, port, reason):
    bastion = limited()
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    try:
        with pytest.raises(paramiko.ChannelException) as refused:
            client.get_transport().open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=10)
        assert refused.value.code == 1  # administratively prohibited
    finally:
        client.close()
    rows = bastion.wait_audit("channels", lambda rows: rows, "refusal row")
    assert rows[-1]["decision"] == "deny"
    assert reason in rows[-1]["reason"] and len(rows[-1]["reason"]) < 100
    assert bastion.proc.poll() is None
