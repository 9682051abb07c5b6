"""authorized_keys files imported with their options, and the options enforced by the running gateway with the
real OpenSSH client (#20 item 2): from= refuses another source, expiry-time refuses a stale key, permitopen
and restrict narrow what the key may open further than the policy."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")


def keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    return Path(f"{path}.pub").read_text().strip()


def test_imported_options_are_enforced_at_login_and_at_open(home, echo_server, tmp_path):
    keys = {name: tmp_path / name for name in ("here", "open", "none", "stale")}
    lines = {name: keygen(path, f"alice@{name}") for name, path in keys.items()}
    other_port = echo_server + 1 if echo_server < 65535 else echo_server - 1
    authorized = tmp_path / "home" / "alice" / ".ssh" / "authorized_keys"
    authorized.parent.mkdir(parents=True)
    authorized.write_text(
        "# alice's keys, as on her old jump host\n"
        f'from="127.0.0.1,!127.0.0.9",no-pty,no-X11-forwarding {lines["here"]}\n'
        f'permitopen="127.0.0.2:{echo_server}" {lines["open"]}\n'
        f'restrict {lines["none"]}\n'
        f'expiry-time="20200101Z" {lines["stale"]}\n'
    )
    imported = bastion(home, "user", "import", str(authorized))
    assert imported.returncode == 0, imported.stderr
    assert "imported 1 files: 4 keys added or changed for 1 users" in imported.stdout
    listed = json.loads(bastion(home, "user", "list", "--json").stdout)
    assert sorted(k["options"] for k in listed[0]["keys"]) == sorted([
        'from="127.0.0.1,!127.0.0.9"', f'permitopen="127.0.0.2:{echo_server}"', "no-port-forwarding",
        'expiry-time="20200101000000Z"'])
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{echo_server},{other_port}"]\n')
    assert bastion(home, "policy", "apply", str(policy)).returncode == 0

    proc, port = start_serve(home)
    try:
        known = tmp_path / "known_hosts"
        host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")

        def ssh(key: str, target_port: int, source: str = "127.0.0.1") -> subprocess.CompletedProcess:
            return subprocess.run(
                [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(keys[key]), "-o", "BatchMode=yes",
                 "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-b", source,
                 "-W", f"127.0.0.2:{target_port}", "alice@127.0.0.1"],
                input=b"ping\n", capture_output=True, timeout=30)

        assert ssh("here", echo_server).stdout == b"ping\n"
        elsewhere = ssh("here", echo_server, source="127.0.0.3")
        assert elsewhere.returncode == 255 and b"Permission denied (publickey)" in elsewhere.stderr
        assert ssh("open", echo_server).stdout == b"ping\n"
        narrowed = ssh("open", other_port)
        assert f"this key may only open 127.0.0.2:{echo_server} (permitopen)".encode() in narrowed.stderr
        assert b"this key may not open tunnels" in ssh("none", echo_server).stderr
        stale = ssh("stale", echo_server)
        assert stale.returncode == 255 and b"Permission denied (publickey)" in stale.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    failures = json.loads(bastion(home, "audit", "auth", "--json").stdout)
    reasons = {row["reason"] for row in failures if row["result"] == "failure"}
    assert 'key not allowed from 127.0.0.3 (from="127.0.0.1,!127.0.0.9")' in reasons
    assert "key expired at 2020-01-01T00:00:00Z (expiry-time)" in reasons


def test_an_option_the_bastion_cannot_honour_refuses_the_whole_import(home, tmp_path):
    key = keygen(tmp_path / "k", "bob@x")
    files = tmp_path / "keys"
    files.mkdir()
    (files / "bob.pub").write_text(f'command="/usr/bin/backup" {key}\n')
    (files / "carol").write_text(f'from="db.example.com" {key}\nenvironment="A=b" {key}\n')
    result = bastion(home, "user", "import", str(files))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for expected in ("bob.pub:1: option command is refused", "carol:1: from=\"db.example.com\"",
                     "carol:2: option environment is refused", "nothing imported"):
        assert expected in result.stderr
    assert json.loads(bastion(home, "user", "list", "--json").stdout) == []


def test_add_key_needs_an_existing_user(home, tmp_path):
    key = keygen(tmp_path / "k", "dave@x")
    result = bastion(home, "user", "add-key", "dave", "--key", f"{tmp_path / 'k'}.pub")
    assert result.returncode == 2 and "no user named 'dave'" in result.stderr
    assert bastion(home, "user", "add", "dave", "--key", f"{tmp_path / 'k'}.pub").returncode == 0
    second = tmp_path / "k2"
    keygen(second, "dave@y")
    added = bastion(home, "user", "add-key", "dave", "--key", f"{second}.pub")
    assert added.returncode == 0 and "dave: added ssh-ed25519" in added.stdout and key
