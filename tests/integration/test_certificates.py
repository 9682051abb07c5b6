"""OpenSSH user certificates (#21) made by the real `ssh-keygen -s`, offered by the real OpenSSH client to a real
gateway on loopback: a certificate from a trusted CA logs in with no key in the store; expired, not yet valid, wrong
principal, host, untrusted, source-address, force-command and unknown-critical-option certificates are refused and
audited (with the certificate's key id, serial and CA where it could be read); no-port-forwarding logs in but opens no
tunnel; a CA removed from the policy ends the live session it let in."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")


def keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    return Path(f"{path}.pub").read_text().strip()


def sign(ca: Path, key: Path, out: Path, *options: str, serial: int = 1, key_id: str = "alice@corp",
         principals: str = "alice", validity: str = "-5m:+1h") -> Path:
    """`ssh-keygen -s CA` over a copy of the user's public key; returns the certificate's path."""
    pub = out.with_suffix(".pub")
    shutil.copy(f"{key}.pub", pub)
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", key_id, "-z", str(serial), "-n", principals,
                    "-V", validity, *options, str(pub)], check=True, capture_output=True)
    return out.parent / f"{out.with_suffix('').name}-cert.pub"


def policy_text(ca_line: str, echo_port: int) -> str:
    return (f'[cas.corp]\nkey = "{ca_line}"\n\n'
            f'[users.alice]\nallow = ["127.0.0.2:{echo_port}"]\n')


class Client:
    """The real OpenSSH client with one key and one certificate, through `-W` to the echo server."""

    def __init__(self, port: int, known: Path, key: Path, echo_port: int):
        self.port, self.known, self.key, self.echo_port = port, known, key, echo_port

    def run(self, cert: Path, user: str = "alice", source: str = "127.0.0.1",
            target: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SSH, "-F", "/dev/null", "-p", str(self.port), "-i", str(self.key), "-o", f"CertificateFile={cert}",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.known}",
             "-b", source, "-W", target or f"127.0.0.2:{self.echo_port}", f"{user}@127.0.0.1"],
            input=b"ping\n", capture_output=True, timeout=30)


def paramiko_login(port: int, key: Path, cert: Path, user: str = "alice") -> bool:
    """Offer `cert` with paramiko, which offers whatever certificate it is given: OpenSSH's client keeps a host
    certificate to itself, so it cannot show the gateway refusing one."""
    pkey = paramiko.Ed25519Key.from_private_key_file(str(key))
    pkey.load_certificate(str(cert))
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client(timeout=10)
        try:
            transport.auth_publickey(user, pkey)
        except paramiko.AuthenticationException:
            return False
        return transport.is_authenticated()
    finally:
        transport.close()


def known_hosts(home: Path, port: int, tmp_path: Path) -> Path:
    known = tmp_path / "known_hosts"
    host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    return known


def ca_fingerprint(ca: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", f"{ca}.pub"], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def test_certificate_matrix_with_openssh(home, echo_server, tmp_path):
    ca, other_ca, key = tmp_path / "ca", tmp_path / "other_ca", tmp_path / "id"
    ca_line = keygen(ca, "ca@corp")
    keygen(other_ca, "ca@elsewhere")
    keygen(key, "alice@laptop")
    certs = tmp_path / "certs"
    certs.mkdir()
    made = {
        "valid": sign(ca, key, certs / "valid", serial=7),
        "expired": sign(ca, key, certs / "expired", serial=8, validity="-2d:-1d"),
        "future": sign(ca, key, certs / "future", serial=9, validity="+1d:+2d"),
        "bob": sign(ca, key, certs / "bob", serial=10, principals="bob", key_id="bob@corp"),
        "host": sign(ca, key, certs / "host", "-h", serial=11),
        "untrusted": sign(other_ca, key, certs / "untrusted", serial=12),
        "source": sign(ca, key, certs / "source", "-O", "source-address=127.0.0.9/32", serial=13),
        "command": sign(ca, key, certs / "command", "-O", "force-command=/bin/true", serial=14),
        "critical": sign(ca, key, certs / "critical", "-O", "critical:bastion-test@example.com=x", serial=15),
        "noforward": sign(ca, key, certs / "noforward", "-O", "no-port-forwarding", serial=16),
        "mallory": sign(ca, key, certs / "mallory", serial=17, principals="mallory", key_id="mallory@corp"),
    }
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(ca_line, echo_server))
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    assert "+ CA corp trusted for user certificates" in applied.stdout

    proc, port = start_serve(home)
    try:
        client = Client(port, known_hosts(home, port, tmp_path), key, echo_server)
        ok = client.run(made["valid"])
        assert ok.stdout == b"ping\n", ok.stderr
        assert client.run(made["source"], source="127.0.0.9").stdout == b"ping\n"  # from the address it names
        # each refusal from its own source address: repeated failures from one source would get it penalized
        refusals = ["expired", "future", "bob", "untrusted", "command", "critical", "mallory"]
        for number, name in enumerate(["source", *refusals]):
            source = "127.0.0.1" if name == "source" else f"127.0.0.{20 + number}"
            refused = client.run(made[name], user="mallory" if name == "mallory" else "alice", source=source)
            assert refused.returncode == 255 and b"Permission denied (publickey)" in refused.stderr, name
            assert refused.stdout == b"", name
        narrowed = client.run(made["noforward"])
        assert paramiko_login(port, key, made["valid"])  # the second client agrees on a good one
        assert not paramiko_login(port, key, made["host"])
        # asyncssh reads the certificate's extensions itself and refuses the channel before the gateway sees it;
        # the session's key_options (certificate_key_options) refuse it too, should asyncssh stop doing so
        assert narrowed.returncode == 255 and narrowed.stdout == b""
        assert b"administratively prohibited: Port forwarding not permitted" in narrowed.stderr, narrowed.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    rows = json.loads(bastion(home, "audit", "auth", "--json").stdout)
    reasons = {row["reason"] for row in rows}
    ca_fp, other_fp = ca_fingerprint(ca), ca_fingerprint(other_ca)
    assert f"certificate accepted: key id alice@corp serial 7 CA {ca_fp}" in reasons
    # (serial 16, no-port-forwarding, logged in too -- the channel open failed after authentication -- but its
    # client left at once, and a session gone before the gateway wrote its row leaves no row)
    expected = [
        ("certificate expired at ", f"key id alice@corp serial 8 CA {ca_fp}"),
        ("certificate not yet valid (valid from ", f"key id alice@corp serial 9 CA {ca_fp}"),
        ("certificate is not valid for user alice (principals: bob)", f"key id bob@corp serial 10 CA {ca_fp}"),
        ("a host certificate is not a user certificate", f"key id alice@corp serial 11 CA {ca_fp}"),
        ("certificate signed by an untrusted CA", f"key id alice@corp serial 12 CA {other_fp}"),
        ("certificate not valid from 127.0.0.1 (source-address 127.0.0.9/32)",
         f"key id alice@corp serial 13 CA {ca_fp}"),
        ("certificate has force-command; a bastion runs no commands", f"key id alice@corp serial 14 CA {ca_fp}"),
        ("unknown user mallory (CA corp requires a known user)", f"key id mallory@corp serial 17 CA {ca_fp}"),
    ]
    for why, which in expected:
        assert any(r.startswith(f"certificate refused: {why}") and r.endswith(which) for r in reasons), (why, reasons)
    # asyncssh refuses a certificate with a critical option it does not know while decoding it: the row names it
    # by what it claims, unverified
    assert ("certificate refused: certificate has unsupported critical option bastion-test@example.com: "
            f"key id alice@corp serial 15 CA {ca_fp} (as it claims, not verified)") in reasons
    assert all(row["result"] == "success" for row in rows if row["reason"].startswith("certificate accepted"))


def test_removing_the_ca_ends_a_live_certificate_session(home, echo_server, tmp_path):
    """1. log in with a certificate and hold a tunnel open 2. apply a policy without the CA 3. the session ends
    within a few seconds, its end row naming why."""
    ca, key = tmp_path / "ca", tmp_path / "id"
    ca_line = keygen(ca, "ca@corp")
    keygen(key, "alice@laptop")
    cert = sign(ca, key, tmp_path / "alice", serial=21)
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(ca_line, echo_server))
    assert bastion(home, "policy", "apply", str(policy)).returncode == 0
    proc, port = start_serve(home)
    try:
        known = known_hosts(home, port, tmp_path)
        live = subprocess.Popen(
            [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", f"CertificateFile={cert}",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}",
             "-W", f"127.0.0.2:{echo_server}", "alice@127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            live.stdin.write(b"first\n")
            live.stdin.flush()
            assert live.stdout.readline() == b"first\n"
            policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{echo_server}"]\n')
            applied = bastion(home, "policy", "apply", "--yes", str(policy))
            assert applied.returncode == 0, applied.stderr
            assert "- CA corp no longer trusted" in applied.stdout
            assert "key removed" not in applied.stdout  # a certificate session has no stored key to lose
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
    sessions = json.loads(bastion(home, "audit", "sessions", "--json").stdout)
    assert [s.get("end_reason") for s in sessions] == ["certificate authority no longer trusted"], sessions
