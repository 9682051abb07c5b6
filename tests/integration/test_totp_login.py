"""The second factor with the real OpenSSH client (#21): key first, "partial success", then a keyboard-interactive
"Verification code:" answered by SSH_ASKPASS (SSH_ASKPASS_REQUIRE=force, no terminal: the client runs in its own
session), the code computed here with pyotp from the secret `user totp enroll` printed.

1. right code: the -W tunnel works, the audit row's method is publickey+totp
2. wrong code: refused, audited, counted toward max_auth_tries (the connection is closed at the limit)
3. the same code twice: the second login is refused as used; the next step's code still works
4. a user without require_totp logs in by key alone (BatchMode), unaffected
5. ProxyJump: the jump leg asks for the code, the inner leg is a second bastion with a key only
6. wrong codes count toward the source penalty; a certificate login needs the code too
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest

from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path], check=True)
    return path


def enroll(home: Path, user: str) -> pyotp.TOTP:
    """`user totp enroll`, and the authenticator app: the secret read back from the otpauth:// URI it printed."""
    result = bastion(home, "user", "totp", "enroll", user)
    assert result.returncode == 0, result.stderr
    uri = next(line for line in result.stdout.splitlines() if line.startswith("otpauth://"))
    parsed = urlparse(uri)
    assert parsed.netloc == "totp" and parsed.path == f"/bastion:{user}"
    query = parse_qs(parsed.query)
    assert query["issuer"] == ["bastion"] and query["digits"] == ["6"] and query["period"] == ["30"]
    assert "█" in result.stdout  # the QR code
    return pyotp.TOTP(query["secret"][0])


class Client:
    """The OpenSSH client against one bastion, answering the code prompt through SSH_ASKPASS."""

    def __init__(self, tmp_path: Path, home: Path, port: int):
        self.tmp_path, self.port = tmp_path, port
        self.known = tmp_path / "known_hosts"
        host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        self.known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
        self.code_file = tmp_path / "code"
        self.prompts = tmp_path / "prompts"
        self.askpass = tmp_path / "askpass.sh"
        self.askpass.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> "{self.prompts}"\ncat "{self.code_file}"\n')
        self.askpass.chmod(0o755)

    def env(self, code: str) -> dict[str, str]:
        self.code_file.write_text(code + "\n")
        return {**os.environ, "SSH_ASKPASS": str(self.askpass), "SSH_ASKPASS_REQUIRE": "force",
                "DISPLAY": os.environ.get("DISPLAY", ":0")}

    def tunnel(self, user: str, key: Path, target: str, code: str = "", batch: bool = False,
               ) -> subprocess.CompletedProcess:
        options = ["-o", "BatchMode=yes"] if batch else [
            "-o", "KbdInteractiveAuthentication=yes",
            "-o", "PreferredAuthentications=publickey,keyboard-interactive",
            "-o", "LogLevel=VERBOSE"]  # says "Authenticated using "publickey" with partial success."
        return subprocess.run(
            [SSH, "-F", "/dev/null", "-p", str(self.port), "-i", str(key), "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={self.known}", *options, "-W", target, f"{user}@127.0.0.1"],
            input=b"ping\n", capture_output=True, timeout=30, env=self.env(code),
            start_new_session=True)  # no controlling terminal: the prompt goes to SSH_ASKPASS


def setup(home: Path, tmp_path: Path, echo_server: int, ops_ports: str = "") -> dict[str, Path]:
    """alice needs a code (through group ops), bob does not; both may reach the echo server (ops: `ops_ports`)."""
    keys = {name: keygen(tmp_path / f"id_{name}") for name in ("alice", "bob")}
    line = {name: Path(f"{key}.pub").read_text().strip() for name, key in keys.items()}  # keys from the policy
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[groups.ops]\nrequire_totp = true\nallow = ["127.0.0.2:{ops_ports or echo_server}"]\n'
                      f'[users.alice]\ngroups = ["ops"]\nkeys = ["{line["alice"]}"]\n'
                      f'[users.bob]\nallow = ["127.0.0.2:{echo_server}"]\nkeys = ["{line["bob"]}"]\n')
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    return keys


def auth_rows(home: Path) -> list[dict]:
    return json.loads(bastion(home, "audit", "auth", "--json").stdout)


def fresh_code(totp: pyotp.TOTP) -> str:
    """The code for now, not in the last two seconds of its step (so a test's two logins see one step)."""
    if 30 - time.time() % 30 < 2:
        time.sleep(2.1)
    return totp.now()


def test_key_then_code_opens_the_tunnel_and_a_user_without_totp_is_unaffected(home, echo_server, tmp_path):
    keys = setup(home, tmp_path, echo_server)
    totp = enroll(home, "alice")
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        ok = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", fresh_code(totp))
        assert ok.stdout == b"ping\n", ok.stderr
        assert b'Authenticated using "publickey" with partial success' in ok.stderr
        assert client.prompts.read_text() == "(alice@127.0.0.1) Verification code: \n"
        # no code: key alone is not enough for alice (BatchMode answers no prompt)
        alone = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", batch=True)
        assert alone.returncode == 255 and b"Permission denied (keyboard-interactive)" in alone.stderr
        # bob needs no code: key alone, in batch mode, never prompted
        client.prompts.unlink()
        bob = client.tunnel("bob", keys["bob"], f"127.0.0.2:{echo_server}", batch=True)
        assert bob.stdout == b"ping\n", bob.stderr
        assert b"partial success" not in bob.stderr and not client.prompts.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    rows = auth_rows(home)
    alice_ok = [r for r in rows if r["user"] == "alice" and r["result"] == "success"]
    assert len(alice_ok) == 1 and alice_ok[0]["method"] == "publickey+totp"
    assert alice_ok[0]["reason"] == "key accepted with a verification code"
    bob_ok = [r for r in rows if r["user"] == "bob" and r["result"] == "success"]
    assert len(bob_ok) == 1 and bob_ok[0]["method"] == "publickey" and bob_ok[0]["reason"] == "key accepted"
    secret = totp.secret
    assert secret not in json.dumps(rows)
    assert secret not in bastion(home, "audit", "export").stdout


def test_wrong_codes_are_refused_audited_and_count_toward_max_auth_tries(home, echo_server, tmp_path):
    config = home / "config.toml"
    config.write_text(config.read_text().replace("max_auth_tries = 6", "max_auth_tries = 2"))
    keys = setup(home, tmp_path, echo_server)
    totp = enroll(home, "alice")
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        right = totp.now()
        wrong = f"{(int(right) + 500000) % 1000000:06d}"
        refused = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", wrong)
        assert refused.returncode == 255 and refused.stdout == b""
        assert b"Too many authentication failures" in refused.stderr, refused.stderr
        assert client.prompts.read_text().count("Verification code:") == 2  # the third prompt never came
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    failures = [(r["method"], r["reason"]) for r in auth_rows(home) if r["result"] == "failure"]
    assert failures.count(("publickey+totp", "wrong verification code")) == 2
    assert ("publickey+totp", "too many authentication failures") in failures
    assert not [r for r in auth_rows(home) if r["result"] == "success"]


def test_a_code_is_used_once(home, echo_server, tmp_path):
    keys = setup(home, tmp_path, echo_server)
    totp = enroll(home, "alice")
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        code = fresh_code(totp)
        first = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", code)
        assert first.stdout == b"ping\n", first.stderr
        # the same code, within its step: refused each time the client asks (3 prompts, OpenSSH's default)
        replay = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", code)
        assert replay.returncode == 255 and replay.stdout == b"", replay.stderr
        assert b"Permission denied" in replay.stderr
        # the next step's code is inside the ±1 window and newer: accepted
        later = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", totp.at(time.time() + 30))
        assert later.stdout == b"ping\n", later.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    rows = auth_rows(home)
    assert [r["reason"] for r in rows if r["result"] == "failure"] == ["verification code already used"] * 3
    assert [r["method"] for r in rows if r["result"] == "success"] == ["publickey+totp"] * 2


def test_enrolment_is_required_and_reset_removes_it(home, echo_server, tmp_path):
    keys = setup(home, tmp_path, echo_server)
    totp = enroll(home, "alice")
    again = bastion(home, "user", "totp", "enroll", "alice")
    assert again.returncode == 2 and "already enrolled" in again.stderr and "--force" in again.stderr
    assert bastion(home, "user", "totp", "enroll", "alice", "--force", "--no-qr").returncode == 0
    reset = bastion(home, "user", "totp", "reset", "alice")
    assert reset.returncode == 0 and "removed" in reset.stdout
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        refused = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", totp.now())
        assert refused.returncode == 255 and b"ask your bastion admin to enrol you" in refused.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    failures = [(r["method"], r["reason"]) for r in auth_rows(home) if r["result"] == "failure"]
    assert failures == [("publickey+totp", "verification code required but none enrolled")]


def test_proxyjump_prompts_on_the_jump_leg(home, echo_server, tmp_path):
    """ssh -J: the jump leg (alice, key and code) is a ssh -W of its own; the inner leg is a second bastion on
    127.0.0.2 where bob logs in by key, with a -W to the echo server."""
    inner_home = tmp_path / "inner"
    assert bastion(inner_home, "init", "--listen", "127.0.0.2:0").returncode == 0
    inner_config = inner_home / "config.toml"
    inner_config.write_text(inner_config.read_text().replace(
        'internal_networks = [', 'internal_networks = ["127.0.0.0/8", '))
    bob_key = keygen(tmp_path / "id_inner_bob")
    assert bastion(inner_home, "user", "add", "bob", "--key", f"{bob_key}.pub").returncode == 0
    inner_policy = tmp_path / "inner.toml"
    inner_policy.write_text(f'[users.bob]\nallow = ["127.0.0.2:{echo_server}"]\n')
    assert bastion(inner_home, "policy", "apply", str(inner_policy)).returncode == 0
    inner, inner_port = start_serve(inner_home)
    keys = setup(home, tmp_path, echo_server, ops_ports=f"{echo_server},{inner_port}")
    totp = enroll(home, "alice")
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        inner_key = (inner_home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        with client.known.open("a") as known:
            known.write(f"[127.0.0.2]:{inner_port} {' '.join(inner_key)}\n")
        config = tmp_path / "ssh_config"
        config.write_text(
            f"Host jump\n  HostName 127.0.0.1\n  Port {port}\n  User alice\n  IdentityFile {keys['alice']}\n"
            f"Host inner\n  HostName 127.0.0.2\n  Port {inner_port}\n  User bob\n  IdentityFile {bob_key}\n"
            f"  ProxyJump jump\n"
            f"Host *\n  IdentitiesOnly yes\n  UserKnownHostsFile {client.known}\n"
            f"  KbdInteractiveAuthentication yes\n  PreferredAuthentications publickey,keyboard-interactive\n")
        result = subprocess.run([SSH, "-F", str(config), "-W", f"127.0.0.2:{echo_server}", "inner"],
                                input=b"ping\n", capture_output=True, timeout=30, env=client.env(fresh_code(totp)),
                                start_new_session=True)
        assert result.stdout == b"ping\n", result.stderr
        assert client.prompts.read_text() == "(alice@127.0.0.1) Verification code: \n"  # asked once: the jump leg
    finally:
        for server in (proc, inner):
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0
    assert [(r["user"], r["method"]) for r in auth_rows(home) if r["result"] == "success"] == \
        [("alice", "publickey+totp")]
    assert [(r["user"], r["method"]) for r in auth_rows(inner_home) if r["result"] == "success"] == \
        [("bob", "publickey")]


def test_wrong_codes_count_toward_the_source_penalty(home, echo_server, tmp_path):
    """Two connections that give only wrong codes (threshold 2): the third, with the right code, is dropped."""
    config = home / "config.toml"
    config.write_text(config.read_text().replace("penalty_threshold = 5", "penalty_threshold = 2"))
    keys = setup(home, tmp_path, echo_server)
    totp = enroll(home, "alice")
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        for _ in range(2):
            wrong = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}",
                                  f"{(int(totp.now()) + 500000) % 1000000:06d}")
            assert wrong.returncode == 255 and b"Permission denied (keyboard-interactive)" in wrong.stderr
        dropped = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", fresh_code(totp))
        assert dropped.returncode == 255 and dropped.stdout == b""
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    reasons = [r["reason"] for r in auth_rows(home) if r["result"] == "failure"]
    assert reasons.count("wrong verification code") == 6  # 3 prompts (OpenSSH's default) per connection
    assert "source refused for 30s after repeated failed connections" in reasons


def test_a_certificate_login_needs_the_code_too(home, echo_server, tmp_path):
    ca = keygen(tmp_path / "ca")
    key = keygen(tmp_path / "id_alice")
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "alice@corp", "-z", "7", "-n", "alice",
                    "-V", "-5m:+1h", f"{key}.pub"], check=True, capture_output=True)
    assert (tmp_path / "id_alice-cert.pub").exists()  # beside the key: OpenSSH offers it by itself
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[cas.corp]\nkey = "{Path(f"{ca}.pub").read_text().strip()}"\n\n'
                      f'[users.alice]\nrequire_totp = true\nallow = ["127.0.0.2:{echo_server}"]\n')
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    totp = enroll(home, "alice")  # the policy made the user; no key in the store
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        ok = client.tunnel("alice", key, f"127.0.0.2:{echo_server}", fresh_code(totp))
        assert ok.stdout == b"ping\n", ok.stderr
        assert b'Authenticated using "publickey" with partial success' in ok.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    success = [r for r in auth_rows(home) if r["result"] == "success"]
    assert len(success) == 1 and success[0]["method"] == "publickey+totp"
    assert success[0]["reason"].startswith("certificate accepted: key id alice@corp serial 7")
    assert success[0]["reason"].endswith(" with a verification code")
