"""`bastion ca init`, `bastion ca sign` and `user import` of cert-authority lines (#21), through the real CLI; the
certificates it signs are checked with the real `ssh-keygen -L` and used by the real OpenSSH client."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.cli.main import main

from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")


def keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    return Path(f"{path}.pub").read_text().strip()


def test_import_of_a_cert_authority_line_is_refused_with_the_policy_lines_to_add(home, tmp_path):
    ca_line = keygen(tmp_path / "ca", "ca@corp")
    user_line = keygen(tmp_path / "alice", "alice@laptop")
    keys = tmp_path / "home" / "alice" / ".ssh" / "authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text(f'cert-authority,principals="alice" {ca_line}\n{user_line}\n')

    refused = bastion(home, "user", "import", str(keys))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and f"{keys}:1: a cert-authority line trusts a CA" in refused.stderr
    assert bastion(home, "user", "list", "--json").stdout.strip() == "[]"  # nothing imported, not even alice's key
    added = bastion(home, "user", "add", "alice", "--key", str(keys))  # the same refusal for `user add`
    assert added.returncode == 2 and "cert-authority" in added.stderr

    policy = tmp_path / "ca.toml"
    policy.write_text(refused.stdout)  # the printed lines are a policy file as they stand
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    assert "+ CA corp trusted for user certificates" in applied.stdout
    shown = bastion(home, "policy", "show").stdout
    assert "[cas.corp]" in shown and ca_line.split()[1] in shown


def in_process(*args: str) -> tuple[int, str, str]:
    """`bastion ARGS` through the real entry point (main: exit codes, one-line errors) in this process."""
    with CliRunner().isolation(env={"COLUMNS": "100"}) as (out, err, _):
        saved, sys.argv = sys.argv, ["bastion", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        finally:
            sys.argv = saved
            sys.stdout.flush()
            sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()


def certificate_fields(path: Path) -> str:
    return subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True).stdout


def test_ca_init_makes_a_private_key_once_and_prints_its_public_key(home):
    made = bastion(home, "ca", "init")
    assert made.returncode == 0, made.stderr
    key, public = home / "user_ca_key", home / "user_ca_key.pub"
    assert key.stat().st_mode & 0o777 == 0o600
    line = public.read_text().strip()
    assert made.stdout.splitlines()[0] == line and line.startswith("ssh-ed25519 ")
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(public)], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    assert f"fingerprint {fingerprint}" in made.stdout
    assert "[cas.home]" in made.stdout  # the lines to declare it with other settings
    before = key.read_bytes()
    again = bastion(home, "ca", "init")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert key.read_bytes() == before
    shown = bastion(home, "policy", "show").stdout
    assert "[cas.home]" in shown and line.split()[1] in shown
    doctor = bastion(home, "doctor").stdout
    assert f"{fingerprint} (user_ca_key) trusted as CA home" in doctor


def test_ca_sign_makes_the_certificate_asked_for_and_refuses_what_it_may_not(home, tmp_path):
    assert bastion(home, "ca", "init").returncode == 0
    user_key = tmp_path / "id_ed25519"
    keygen(user_key, "alice@laptop")
    signed = bastion(home, "ca", "sign", "alice", "--key", f"{user_key}.pub", "--valid", "8h",
                     "--principal", "ops", "--source-address", "127.0.0.0/8,::1")
    assert signed.returncode == 0, signed.stderr
    cert = tmp_path / "id_ed25519-cert.pub"
    cert.write_text(signed.stdout)
    fields = certificate_fields(cert)
    assert "user certificate" in fields and 'Key ID: "alice@bastion"' in fields
    assert "Serial: 1" in fields
    principals = fields.split("Principals:")[1].split("Critical Options:")[0].split()
    assert principals == ["alice", "ops"]
    assert "source-address 127.0.0.0/8,::1/128" in fields
    extensions = fields.split("Extensions:")[1].split()
    assert extensions == ["permit-port-forwarding"]  # nothing a bastion does not need
    assert "serial 1" in signed.stderr and "alice is not a user of the policy" in signed.stderr

    out = tmp_path / "second-cert.pub"
    second = bastion(home, "ca", "sign", "alice", "--key", f"{user_key}.pub", "--valid", "30m", "-o", str(out))
    assert second.returncode == 0 and second.stdout == ""
    assert "Serial: 2" in certificate_fields(out)
    assert (home / "user_ca_key.serial").read_text().strip() == "2"
    exists = bastion(home, "ca", "sign", "alice", "--key", f"{user_key}.pub", "--valid", "30m", "-o", str(out))
    assert exists.returncode == 2 and "already exists" in exists.stderr

    for args, words in [
        (["--valid", "25h"], "longer than ca_max_validity (24h"),
        (["--valid", "8 hours"], "is not a length of time"),
        (["--valid", "1h", "--serial", "2"], "not above the last serial issued (2)"),
        (["--valid", "1h", "--source-address", "example.com"], "is not an address or CIDR"),
        (["--valid", "1h", "--principal", "Bad Name"], "is not a valid user or group name"),
    ]:  # in this process, through the real entry point: a process each would add seconds for nothing
        code, _, err = in_process("--home", str(home), "ca", "sign", "alice", "--key", f"{user_key}.pub", *args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and words in err, err
    assert (home / "user_ca_key.serial").read_text().strip() == "2"  # a refusal uses up no serial
    with_serial = bastion(home, "ca", "sign", "alice", "--key", f"{user_key}.pub", "--valid", "1h",
                          "--serial", "100")
    assert "Serial: 100" in certificate_fields(_saved(tmp_path, with_serial.stdout))
    config = home / "config.toml"
    config.write_text(config.read_text().replace('ca_max_validity = "24h"', 'ca_max_validity = "2d"'))
    assert bastion(home, "ca", "sign", "alice", "--key", f"{user_key}.pub", "--valid", "25h").returncode == 0
    not_a_key = bastion(home, "ca", "sign", "alice", "--key", str(cert), "--valid", "1h")
    assert not_a_key.returncode == 2 and "is a certificate" in not_a_key.stderr


def _saved(directory: Path, text: str) -> Path:
    path = directory / "saved-cert.pub"
    path.write_text(text)
    return path


@pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")
def test_a_certificate_from_ca_sign_logs_in_through_ssh_config_with_no_stored_key(home, echo_server, tmp_path):
    """The running server trusts a CA made after it started (no restart, no policy file naming it); the user
    has no key in the store; the config `ssh-config --certificate-file` prints is all OpenSSH needs."""
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{echo_server}"]\n')
    assert bastion(home, "policy", "apply", str(policy)).returncode == 0
    proc, port = start_serve(home)
    try:
        assert bastion(home, "ca", "init").returncode == 0
        user_key = tmp_path / "id_ed25519"
        keygen(user_key, "alice@laptop")
        cert = tmp_path / "id_ed25519-cert.pub"
        signed = bastion(home, "ca", "sign", "alice", "--key", f"{user_key}.pub", "--valid", "1h", "-o", str(cert))
        assert signed.returncode == 0, signed.stderr
        assert "not a user of the policy" not in signed.stderr
        known = tmp_path / "known_hosts"
        assert bastion(home, "ssh-config", "alice", "--host", "127.0.0.1", "--port", str(port), "--known-hosts",
                       "-o", str(known)).returncode == 0
        conf = tmp_path / "ssh_config"
        made = bastion(home, "ssh-config", "alice", "--host", "127.0.0.1", "--port", str(port),
                       "--certificate-file", str(cert), "--known-hosts-file", str(known), "-o", str(conf))
        assert made.returncode == 0, made.stderr
        text = conf.read_text()
        assert f"CertificateFile {cert}" in text and f"IdentityFile {user_key}" in text
        tunnel = subprocess.run([SSH, "-F", str(conf), "-o", "BatchMode=yes", "-W", f"127.0.0.2:{echo_server}",
                                 "bastion"], input=b"ping\n", capture_output=True, timeout=30)
        assert tunnel.stdout == b"ping\n", tunnel.stderr
        # the policy's [revoked] names the home CA's serials by its name, as for any CA
        policy.write_text(policy.read_text() + "\n[revoked]\nserials = { home = [1] }\n")
        assert bastion(home, "policy", "apply", "--yes", str(policy)).returncode == 0
        revoked = subprocess.run([SSH, "-F", str(conf), "-o", "BatchMode=yes", "-b", "127.0.0.3",
                                  "-W", f"127.0.0.2:{echo_server}", "bastion"], capture_output=True, timeout=30)
        assert revoked.returncode == 255 and b"Permission denied" in revoked.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert bastion(home, "user", "list", "--json").stdout.strip() == "[]" or \
        all(not user["keys"] for user in json.loads(bastion(home, "user", "list", "--json").stdout))
    rows = json.loads(bastion(home, "audit", "auth", "--json").stdout)
    fingerprint = bastion(home, "doctor").stdout.split("home CA")[1].split()[0]
    reasons = [row["reason"] for row in rows]
    assert f"certificate accepted: key id alice@bastion serial 1 CA {fingerprint}" in reasons, reasons
    assert any("serial 1 of CA home revoked by the policy" in reason for reason in reasons), reasons
