"""Races an attacker with a valid key can play (issue #18, items 1-5, 8, 10): a login or an open that is under way
when access is taken away, opens sent all at once, a connect before its audit row, a flood of refusals, and
the server's own audit fault counted against its victims. Each scenario uses real clients against a real server
in the sealed testbed; the slow target is a listener in the lan namespace whose accept queue is full, so the
bastion's SYN is dropped until the test makes room (the connect then completes on a SYN retransmission)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sqlite3
import subprocess
import time

import asyncssh
import paramiko
import pytest

from testbed import (CLOSED_PORT, DEFAULT_POLICY, ECHO_PORT, LAN_ADDR, LAN_ADDR2, SshClient, kill_group, netns_socket,
                     stop_process, wait_until)

pytestmark = pytest.mark.netns


def start_bastion(make_bastion, template, **config):
    bastion = make_bastion()
    shutil.copytree(template, bastion.home)
    if config:
        bastion.set_config(**config)
    bastion.start()
    return bastion


def transport_to(testbed, bastion) -> paramiko.Transport:
    """A paramiko transport to the bastion, key exchange done, not yet authenticated."""
    sock = testbed.connect(testbed.gw, (bastion.host, bastion.port), 10)
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=10)
    return transport


def echo_through(transport: paramiko.Transport, payload: bytes = b"ping\n") -> bytes:
    channel = transport.open_channel("direct-tcpip", (LAN_ADDR, ECHO_PORT), ("127.0.0.1", 0), timeout=10)
    try:
        channel.settimeout(10)
        channel.sendall(payload)
        return channel.recv(len(payload))
    finally:
        channel.close()


class SlowTarget:
    """A listener on LAN_ADDR:port in lan whose accept queue is full: connects to it hang (their SYNs are dropped)
    until `release()` accepts the queued connections."""

    def __init__(self, testbed, port: int):
        self.testbed = testbed
        self.listener = netns_socket(testbed.lan)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LAN_ADDR, port))
        self.listener.listen(0)
        self.fillers = []
        for _ in range(4):  # a backlog of 0 holds one or two; the rest of these hang, then are dropped
            sock = netns_socket(testbed.gw)
            sock.setblocking(False)
            sock.connect_ex((LAN_ADDR, port))
            self.fillers.append(sock)
        time.sleep(0.3)

    def syn_sent_from_bastion(self, port: int) -> bool:
        out = self.testbed.run(self.testbed.gw, ["ss", "-Htn", "state", "syn-sent", "dst", f"{LAN_ADDR}:{port}"],
                               timeout=5).stdout.decode()
        return len(out.strip().splitlines()) > len(self.fillers) - 2

    def release(self) -> None:
        """Accept whatever is queued, and keep accepting, so the next retransmitted SYN gets through."""
        self.listener.settimeout(0.2)
        for sock in self.fillers:
            sock.close()
        self.fillers.clear()

    def accept(self, timeout: float) -> socket.socket | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn, peer = self.listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            if peer[0] == "10.99.0.1":
                return conn
            conn.close()
        return None

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()


# ---- 1 and 2: the login is decided against the store as it is when the session begins ------------------------

class PausingClient(asyncssh.SSHClient):
    """Offers its key only after `pause()` has run (in a thread): by then the server has seen the first auth
    request (asyncssh's client starts with "none") and read the user's keys."""

    def __init__(self, key_path, pause):
        self._key_path = key_path
        self._pause = pause

    async def public_key_auth_requested(self):
        if self._pause is not None:
            pause, self._pause = self._pause, None
            await asyncio.to_thread(pause)
            return [asyncssh.read_private_key(self._key_path)]
        return None


async def echo_after_paused_login(testbed, bastion, key_path, pause) -> object:
    """Log in as alice, running `pause` mid-authentication, then echo through a tunnel; returns the echo or the
    error that stopped it."""
    sock = testbed.connect(testbed.gw, (bastion.host, bastion.port), 10)
    try:
        conn = await asyncio.wait_for(asyncssh.connect(
            sock=sock, host=bastion.host, username="alice", client_keys=[], agent_path=None, known_hosts=None,
            client_factory=lambda: PausingClient(key_path, pause)), 20)
    except (asyncssh.Error, OSError) as exc:
        return exc
    async with conn:
        try:
            reader, writer = await conn.open_connection(LAN_ADDR, ECHO_PORT)
            writer.write(b"ping\n")
            return await asyncio.wait_for(reader.read(5), 5)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            return exc


def test_key_removed_while_logging_in_gets_no_session(testbed, bastion, keys):
    # 1. alice starts to log in; 2. her key is removed meanwhile; 3. she completes the login and opens a tunnel
    def remove_key() -> None:
        bastion.cli("user", "remove-key", "alice", keys["alice"].fingerprint)

    outcome = asyncio.run(echo_after_paused_login(testbed, bastion, keys["alice"].path, remove_key))
    assert outcome != b"ping\n", "a key removed during the login still opened a tunnel"
    rows = bastion.wait_audit("auth", lambda rows: any("key removed" in r["reason"] for r in rows),
                              "the refused login")
    assert not [r for r in rows if r["result"] == "success"], rows
    assert bastion.audit("sessions") == [] and bastion.audit("channels") == []


def test_user_removed_while_logging_in_gets_no_session(testbed, bastion, keys):
    def remove_user() -> None:
        bastion.cli("user", "remove", "alice")

    outcome = asyncio.run(echo_after_paused_login(testbed, bastion, keys["alice"].path, remove_user))
    assert outcome != b"ping\n", "a user removed during the login still opened a tunnel"
    bastion.wait_audit("auth", lambda rows: any("user removed" in r["reason"] for r in rows), "the refused login")
    assert bastion.audit("sessions") == [] and bastion.audit("channels") == []


def test_user_expiring_while_logging_in_gets_no_session(testbed, bastion, keys):
    def expire_user() -> None:
        bastion.apply_policy(DEFAULT_POLICY.replace('[users.alice]\n', '[users.alice]\nexpires = 2020-01-01T00:00:00Z\n'))

    outcome = asyncio.run(echo_after_paused_login(testbed, bastion, keys["alice"].path, expire_user))
    assert outcome != b"ping\n", "a user expired during the login still opened a tunnel"
    bastion.wait_audit("auth", lambda rows: any("expired" in r["reason"] for r in rows), "the refused login")
    assert bastion.audit("sessions") == [] and bastion.audit("channels") == []


def test_expired_user_fails_authentication(bastion, ssh):
    bastion.apply_policy(DEFAULT_POLICY.replace('[users.alice]\n', '[users.alice]\nexpires = 2020-01-01T00:00:00Z\n'))
    result = ssh.run("bastion", timeout=15)
    assert result.returncode == 255 and b"Permission denied" in result.stderr, result.stderr
    assert b"Hello alice" not in result.stdout
    rows = bastion.wait_audit("auth", lambda rows: any("expired" in r["reason"] for r in rows), "the refusal")
    assert all(r["result"] == "failure" for r in rows), rows
    assert bastion.audit("sessions") == []


# ---- 3: an open under way when its grant is revoked does not survive the revocation --------------------------

def test_tunnel_being_opened_when_its_grant_is_revoked_never_opens(testbed, make_bastion, bastion_home_template,
                                                                   keys):
    bastion = start_bastion(make_bastion, bastion_home_template, connect_timeout=20)
    target = SlowTarget(testbed, CLOSED_PORT)
    client = SshClient(testbed, bastion, bastion.home.parent / "client", keys["alice"])
    proc = client.popen("-W", f"{LAN_ADDR}:{CLOSED_PORT}", "bastion", stdin=subprocess.PIPE)
    try:
        # 1. the bastion has decided and is connecting (its SYN is dropped by the full queue)
        wait_until(lambda: target.syn_sent_from_bastion(CLOSED_PORT), 10, "the bastion connecting to the target")
        # 2. the grant is revoked while the open is pending
        bastion.apply_policy(DEFAULT_POLICY.replace(f",{CLOSED_PORT}\"", "\""))
        # 3. the target takes the connection (a retransmitted SYN gets through)
        target.release()
        leg = target.accept(timeout=8)
        # 4. the tunnel never opens: the client is refused, the target gets no byte
        proc.stdin.write(b"secret\n")
        proc.stdin.flush()
        proc.wait(timeout=15)
        stderr = proc.stderr.read()
        assert proc.returncode == 255, stderr
        assert b"revoked" in stderr or b"prohibited" in stderr, stderr
        if leg is not None:
            leg.settimeout(3)
            try:
                assert leg.recv(100) == b""
            except ConnectionResetError:
                pass
            leg.close()
    finally:
        stop_process(proc)
        kill_group(proc)
        target.close()
    rows = bastion.wait_audit("channels", lambda rows: rows and rows[-1]["closed_at"], "the channel row closed")
    assert rows[-1]["close_reason"].startswith("revoked"), rows[-1]
    assert rows[-1]["bytes_up"] == 0


# ---- 4: the channel cap holds against opens sent all at once ------------------------------------------------

async def _open_many(testbed, bastion, key_path, count: int) -> list[object]:
    sock = testbed.connect(testbed.gw, (bastion.host, bastion.port), 10)
    async with asyncssh.connect(sock=sock, host=bastion.host, username="alice", client_keys=[str(key_path)],
                                known_hosts=None, agent_path=None) as conn:
        results = await asyncio.gather(
            *(conn.create_connection(asyncssh.SSHTCPSession, LAN_ADDR, ECHO_PORT) for _ in range(count)),
            return_exceptions=True)
        opened = [r for r in results if not isinstance(r, BaseException)]
        for chan, _ in opened:
            chan.close()
        return results


def test_channel_cap_holds_when_opens_arrive_at_once(testbed, make_bastion, bastion_home_template, keys):
    bastion = start_bastion(make_bastion, bastion_home_template, max_channels_per_user=3)
    results = asyncio.run(_open_many(testbed, bastion, keys["alice"].path, 40))
    opened = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, asyncssh.ChannelOpenError)]
    assert len(opened) == 3, [str(r) for r in results if isinstance(r, BaseException)][:3]
    assert len(refused) == 37 and all("too many open channels" in r.reason for r in refused)


def test_inbound_remote_forward_connections_count_toward_the_cap(testbed, make_bastion, bastion_home_template, keys):
    bastion = start_bastion(make_bastion, bastion_home_template, max_channels_per_user=1)
    bastion.apply_policy(DEFAULT_POLICY + 'listen = ["127.0.0.1:9000-9009"]\n')

    async def scenario() -> bytes:
        sock = testbed.connect(testbed.gw, (bastion.host, bastion.port), 10)
        async with asyncssh.connect(sock=sock, host=bastion.host, username="alice",
                                    client_keys=[str(keys["alice"].path)], known_hosts=None, agent_path=None) as conn:
            # the one slot is taken by a -L style tunnel
            chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, LAN_ADDR, ECHO_PORT)
            listener = await conn.forward_remote_port("127.0.0.1", 9005, "127.0.0.1", 9)
            inbound = await asyncio.to_thread(testbed.connect, testbed.gw, ("127.0.0.1", 9005), 5)
            inbound.settimeout(5)
            try:
                data = await asyncio.to_thread(inbound.recv, 10)  # closed by the bastion: refused
            except ConnectionResetError:
                data = b""
            inbound.close()
            listener.close()
            chan.close()
            return data
    assert asyncio.run(scenario()) == b""
    rows = bastion.wait_audit("channels", lambda rows: any(r["kind"] == "forwarded-tcpip" for r in rows),
                              "the inbound connection's row")
    inbound_rows = [r for r in rows if r["kind"] == "forwarded-tcpip"]
    assert inbound_rows[-1]["decision"] == "deny" and "too many open channels" in inbound_rows[-1]["reason"]


# ---- 5: no packet toward a target without a committed row -----------------------------------------------------

def test_no_connect_toward_a_target_without_a_committed_row(testbed, bastion, keys):
    listener = netns_socket(testbed.lan)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LAN_ADDR, CLOSED_PORT))
    listener.listen(16)
    listener.settimeout(0.5)
    transport = transport_to(testbed, bastion)
    transport.auth_publickey("alice", paramiko.Ed25519Key.from_private_key_file(str(keys["alice"].path)))
    assert echo_through(transport) == b"ping\n"  # the session row is committed
    blocker = sqlite3.connect(bastion.home / "bastion.db", timeout=1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the audit writer now waits for the lock, then fails
    try:
        with pytest.raises(paramiko.ChannelException) as refused:
            transport.open_channel("direct-tcpip", (LAN_ADDR, CLOSED_PORT), ("127.0.0.1", 0), timeout=30)
        assert refused.value.code == 1  # administratively prohibited: the audit log is down
        connected = []
        try:
            connected.append(listener.accept())
        except socket.timeout:
            pass
        assert connected == [], "the target saw a connect that no audit row names"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        transport.close()
        listener.close()


# ---- 8: a flood of refusals ends the session, not the audit disk -------------------------------------------

def test_refusal_flood_disconnects_the_session(testbed, make_bastion, bastion_home_template, keys, tmp_path):
    bastion = start_bastion(make_bastion, bastion_home_template, max_refusals_per_minute=10)
    transport = transport_to(testbed, bastion)
    transport.auth_publickey("alice", paramiko.Ed25519Key.from_private_key_file(str(keys["alice"].path)))
    attempts = 0
    try:
        for attempts in range(1, 51):
            try:
                transport.open_channel("direct-tcpip", (LAN_ADDR2, 22), ("127.0.0.1", 0), timeout=5)
            except paramiko.ChannelException:
                continue
            except (paramiko.SSHException, EOFError, OSError):
                break
        wait_until(lambda: not transport.is_active(), 5, "the flooding session to be disconnected")
    finally:
        transport.close()
    assert attempts <= 12, attempts
    rows = bastion.wait_audit("sessions", lambda rows: rows and rows[-1]["ended_at"], "the session's end")
    assert "too many refused requests" in rows[-1]["end_reason"]
    denied = [r for r in bastion.audit("channels") if r["decision"] == "deny"]
    assert len(denied) == 10
    # another session of the same user is unaffected
    other = transport_to(testbed, bastion)
    try:
        other.auth_publickey("alice", paramiko.Ed25519Key.from_private_key_file(str(keys["alice"].path)))
        assert echo_through(other) == b"ping\n"
    finally:
        other.close()


# ---- 10: the server's own fault does not count against a client's address --------------------------------

def test_audit_outage_does_not_penalize_the_refused_source(testbed, bastion, ssh):
    blocker = sqlite3.connect(bastion.home / "bastion.db", timeout=1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(7):  # more than penalty_threshold (5)
            result = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"x\n", timeout=40)
            assert result.returncode == 255 and b"audit log unavailable" in result.stderr, result.stderr
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: "audit log writable again" in bastion.log(), 15, "the store to be back")
    result = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"after\n")
    assert result.stdout == b"after\n", result.stderr
    assert "after repeated failed connections" not in bastion.log()
