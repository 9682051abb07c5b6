"""principals_as_groups = true (#21) end to end: a certificate made by the real `ssh-keygen -s -n alice,ops`, offered
by the real OpenSSH client on loopback, reaches what the group ops may reach, audited as granted through the
certificate; without the group principal, or once the CA stops saying principals_as_groups, it does not (a live
tunnel is closed); with require_known_user = false an unknown user gets the group's rules only."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest

from tests.integration.test_certificates import SSH, Client, keygen, known_hosts, sign
from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")


def policy_text(ca_line: str, echo_port: int, as_groups: bool = True, listen_port: int = 1) -> str:
    return (f'[cas.corp]\nkey = "{ca_line}"\nprincipals_as_groups = {str(as_groups).lower()}\n'
            "require_known_user = false\n\n"
            f'[groups.ops]\nallow = ["127.0.0.2:{echo_port}"]\nlisten = ["127.0.0.1:{listen_port}"]\n\n'
            "[users.alice]\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def remote_forward(port: int, key, cert, known, listen_port: int, echo_port: int, source: str) -> subprocess.Popen:
    return subprocess.Popen(
        [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", f"CertificateFile={cert}",
         "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}",
         "-o", "ExitOnForwardFailure=yes", "-b", source, "-N",
         "-R", f"127.0.0.1:{listen_port}:127.0.0.2:{echo_port}", "alice@127.0.0.1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def echo_through(port: int, deadline: float) -> bytes:
    """Send a line to the bastion's listener (once it is up) and read what comes back."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"via -R\n")
                return conn.recv(100)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_principal_naming_a_group_grants_its_rules(home, echo_server, tmp_path):
    ca, key = tmp_path / "ca", tmp_path / "id"
    ca_line = keygen(ca, "ca@corp")
    keygen(key, "alice@laptop")
    certs = tmp_path / "certs"
    certs.mkdir()
    with_ops = sign(ca, key, certs / "ops", serial=1, principals="alice,ops")
    alone = sign(ca, key, certs / "alone", serial=2, principals="alice")
    stranger = sign(ca, key, certs / "stranger", serial=3, principals="mallory,ops", key_id="mallory@corp")
    group_only = sign(ca, key, certs / "grouponly", serial=4, principals="ops", key_id="ops@corp")
    policy = tmp_path / "policy.toml"
    listen_port = free_port()
    policy.write_text(policy_text(ca_line, echo_server, listen_port=listen_port))
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr

    proc, port = start_serve(home)
    try:
        known = known_hosts(home, port, tmp_path)
        client = Client(port, known, key, echo_server)
        ok = client.run(with_ops)
        assert ok.stdout == b"ping\n", ok.stderr
        refused = client.run(alone, source="127.0.0.3")
        assert b"alice may not reach 127.0.0.2" in refused.stderr and refused.stdout == b""
        unknown = client.run(stranger, user="mallory", source="127.0.0.4")  # require_known_user = false
        assert unknown.stdout == b"ping\n", unknown.stderr
        # a certificate for the group alone logs nobody in: the login user must be a principal
        impostor = client.run(group_only, user="alice", source="127.0.0.5")
        assert impostor.returncode == 255 and b"Permission denied" in impostor.stderr

        # -R through the group's listen rule: granted with the group principal, refused without
        forward = remote_forward(port, key, with_ops, known, listen_port, echo_server, "127.0.0.8")
        try:
            assert echo_through(listen_port, time.monotonic() + 15) == b"via -R\n"
        finally:
            forward.terminate()
            forward.wait(timeout=15)
        refused_forward = remote_forward(port, key, alone, known, listen_port, echo_server, "127.0.0.9")
        assert refused_forward.wait(timeout=15) == 255
        assert b"remote port forwarding failed" in refused_forward.stderr.read()

        # a live tunnel granted through the certificate closes when the CA stops mapping principals to groups
        live = subprocess.Popen(
            [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", f"CertificateFile={with_ops}",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}",
             "-b", "127.0.0.6", "-W", f"127.0.0.2:{echo_server}", "alice@127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            live.stdin.write(b"first\n")
            live.stdin.flush()
            assert live.stdout.readline() == b"first\n"
            policy.write_text(policy_text(ca_line, echo_server, as_groups=False, listen_port=listen_port))
            changed = bastion(home, "policy", "apply", "--yes", str(policy))
            assert changed.returncode == 0, changed.stderr
            started = time.monotonic()
            live.wait(timeout=15)
            assert time.monotonic() - started < 5
        finally:
            if live.poll() is None:
                live.kill()
                live.wait()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    channels = json.loads(bastion(home, "audit", "channels", "--json").stdout)
    granted = [row for row in channels if row["decision"] == "allow" and row["kind"] == "direct-tcpip"]
    assert [row["listener_id"] for row in channels if row["kind"] == "forwarded-tcpip"] == [1]  # the -R echo
    assert {row["user"] for row in granted} == {"alice", "mallory"}
    rule = f"groups.ops.allow via certificate: 127.0.0.2:{echo_server}"
    assert all(row["rule"] == rule for row in granted), granted
    closed = [row for row in granted if (row.get("close_reason") or "").startswith("revoked")]
    assert len(closed) == 1 and "alice may not reach" in closed[0]["close_reason"], granted
    listeners = json.loads(bastion(home, "audit", "listeners", "--json").stdout)
    assert [row["decision"] for row in listeners] == ["allow", "deny"], listeners
    assert listeners[0]["rule"] == f"groups.ops.listen via certificate: 127.0.0.1:{listen_port}"
