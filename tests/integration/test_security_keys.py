"""Security keys (#21) with real signatures: OpenSSH's software authenticator (tests/sk_dummy, built here with gcc)
makes sk-ssh-ed25519 and sk-ecdsa-sha2-nistp256 keys with `ssh-keygen -w`, and the real OpenSSH client signs with it
(`-o SecurityKeyProvider=`) against a real `bastion serve` on loopback. sk-dummy signs with the flags its key was
made with: user presence by default, none with `-O no-touch-required`, presence and verification with
`-O verify-required` (OpenSSH 9.2 asks for a PIN only when the authenticator says one is wanted; sk-dummy never
does, so no PIN is typed: the flag is what is tested).

| user  | policy / key option                         | key                           | result                        |
|-------|---------------------------------------------|-------------------------------|-------------------------------|
| alice | none                                        | ed25519-sk, ecdsa-sk (touch)  | in; "security key: user presence, counter N" |
| alice | none                                        | ed25519-sk, no touch          | refused "user presence not asserted" |
| carol | no-touch-required on her key's line         | ed25519-sk, no touch          | in                            |
| dave  | group pin: require_user_verification        | ed25519-sk, touch only        | refused "user verification not asserted" |
| dave  |                                             | ed25519-sk, verify-required   | in; "user presence, user verification" |
| dave  |                                             | ssh-ed25519                   | refused "a security key is required (require_user_verification) …" |
| erin  | require_security_key                        | ssh-ed25519                   | refused "a security key is required (require_security_key) …" |
| erin  |                                             | ed25519-sk                    | in                            |
| frank | verify-required on his key's line           | ed25519-sk, touch only        | refused "user verification not asserted" |
| bob   | none                                        | ssh-ed25519                   | in, unaffected                |

and certificates of security keys (a second test): an sk certificate logs in a require_security_key user; a
certificate of a plain key is refused for them; a no-touch key's certificate is refused unless the CA signed it with
the no-touch-required extension; a certificate with the critical option verify-required (OpenSSH's way for a CA to
demand a PIN, which asyncssh alone refuses to decode) logs in only with a signature that asserts user verification.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")
SK_DUMMY = Path(__file__).resolve().parents[1] / "sk_dummy"
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> Path:
    """sk-dummy.so, built from tests/sk_dummy into a temporary directory (never into the tree)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("needs a C compiler to build OpenSSH's software authenticator (sk-dummy)")
    built = tmp_path_factory.mktemp("sk") / "sk-dummy.so"
    result = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-Wno-deprecated-declarations", "-I", str(SK_DUMMY), "-o", str(built),
         str(SK_DUMMY / "sk-dummy.c"), str(SK_DUMMY / "ed25519-openssl.c"), "-lcrypto"],
        capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot build sk-dummy (needs libssl-dev): {result.stderr[-300:]}")
    return built


def sk_keygen(provider: Path, path: Path, *options: str, kind: str = "ed25519-sk") -> Path:
    """A security key made by ssh-keygen with the software authenticator; `options` are ssh-keygen's -O values."""
    flags = [arg for option in options for arg in ("-O", option)]
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-w", str(provider), "-N", "", "-C", path.name, *flags,
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return path


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


def line(key: Path) -> str:
    return Path(f"{key}.pub").read_text().strip()


class Client:
    """The real OpenSSH client: one key (and maybe a certificate), the software authenticator, -W to the echo
    server; a PIN prompt is answered through SSH_ASKPASS (no terminal: its own session)."""

    def __init__(self, tmp_path: Path, home: Path, port: int, provider: Path, echo_port: int):
        self.port, self.provider, self.echo_port = port, provider, echo_port
        self.known = tmp_path / "known_hosts"
        host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        self.known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
        self.prompts = tmp_path / "prompts"
        self.askpass = tmp_path / "askpass.sh"
        self.askpass.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> "{self.prompts}"\necho 123456\n')
        self.askpass.chmod(0o755)

    def run(self, user: str, key: Path, source: str, cert: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "SSH_ASKPASS": str(self.askpass), "SSH_ASKPASS_REQUIRE": "force",
               "DISPLAY": os.environ.get("DISPLAY", ":0")}
        certificate = ["-o", f"CertificateFile={cert}"] if cert else []
        return subprocess.run(
            [SSH, "-F", "/dev/null", "-p", str(self.port), "-i", str(key), *certificate,
             "-o", f"SecurityKeyProvider={self.provider}", "-o", "IdentitiesOnly=yes",
             "-o", "PreferredAuthentications=publickey", "-o", f"UserKnownHostsFile={self.known}",
             "-b", source, "-W", f"127.0.0.2:{self.echo_port}", f"{user}@127.0.0.1"],
            input=b"ping\n", capture_output=True, timeout=30, env=env, start_new_session=True)


def fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def auth_rows(home: Path) -> list[dict]:
    return json.loads(bastion(home, "audit", "auth", "--json").stdout)


def reasons_for(home: Path, key: Path, result: str) -> list[str]:
    return [row["reason"] for row in auth_rows(home)
            if row["key_fingerprint"] == fingerprint(key) and row["result"] == result]


def test_presence_verification_and_key_types_with_real_security_key_signatures(home, echo_server, tmp_path,
                                                                               provider):
    keys = {
        "alice": sk_keygen(provider, tmp_path / "alice_sk"),
        "alice_ecdsa": sk_keygen(provider, tmp_path / "alice_ecdsa_sk", kind="ecdsa-sk"),
        "alice_untouched": sk_keygen(provider, tmp_path / "alice_untouched_sk", "no-touch-required"),
        "carol": sk_keygen(provider, tmp_path / "carol_sk", "no-touch-required"),
        "dave_touch": sk_keygen(provider, tmp_path / "dave_touch_sk"),
        "dave_pin": sk_keygen(provider, tmp_path / "dave_pin_sk", "verify-required"),
        "dave_plain": keygen(tmp_path / "dave_plain"),
        "erin_plain": keygen(tmp_path / "erin_plain"),
        "erin": sk_keygen(provider, tmp_path / "erin_sk"),
        "frank": sk_keygen(provider, tmp_path / "frank_sk"),
        "bob": keygen(tmp_path / "bob"),
    }
    files = tmp_path / "authorized"
    files.mkdir()
    (files / "alice").write_text("".join(f"{line(keys[k])}\n" for k in ("alice", "alice_ecdsa", "alice_untouched")))
    (files / "carol").write_text(f"no-touch-required {line(keys['carol'])}\n")
    (files / "dave").write_text("".join(f"{line(keys[k])}\n" for k in ("dave_touch", "dave_pin", "dave_plain")))
    (files / "erin").write_text(f"{line(keys['erin_plain'])}\n{line(keys['erin'])}\n")
    (files / "frank").write_text(f"verify-required {line(keys['frank'])}\n")
    (files / "bob").write_text(f"{line(keys['bob'])}\n")
    imported = bastion(home, "user", "import", str(files))
    assert imported.returncode == 0, imported.stderr
    listed = {user["name"]: user for user in json.loads(bastion(home, "user", "list", "--json").stdout)}
    assert [key["options"] for key in listed["carol"]["keys"]] == ["no-touch-required"]
    assert [key["options"] for key in listed["frank"]["keys"]] == ["verify-required"]
    grant = f'allow = ["127.0.0.2:{echo_server}"]'
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[groups.pin]\nrequire_user_verification = true\n{grant}\n\n"
                      + "".join(f"[users.{name}]\n{grant}\n" for name in ("alice", "carol", "frank", "bob"))
                      + f'[users.dave]\ngroups = ["pin"]\n\n[users.erin]\nrequire_security_key = true\n{grant}\n')
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr

    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port, provider, echo_server)
        sources = iter(f"127.0.0.{n}" for n in range(10, 60))  # one per refusal: no source gets penalized

        def works(user: str, key: str) -> None:
            result = client.run(user, keys[key], "127.0.0.1")
            assert result.stdout == b"ping\n", (key, result.stderr)

        def refused(user: str, key: str) -> None:
            result = client.run(user, keys[key], next(sources))
            assert result.returncode == 255 and b"Permission denied (publickey)" in result.stderr, \
                (key, result.stderr)

        works("alice", "alice")
        works("alice", "alice_ecdsa")
        refused("alice", "alice_untouched")
        works("carol", "carol")
        refused("dave", "dave_touch")
        works("dave", "dave_pin")
        assert "Confirm user presence for key ED25519-SK" in client.prompts.read_text()  # the client's touch notice
        refused("dave", "dave_plain")
        refused("erin", "erin_plain")
        works("erin", "erin")
        refused("frank", "frank")
        works("bob", "bob")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    counter = r"counter \d+"
    accepted = reasons_for(home, keys["alice"], "success")
    assert len(accepted) == 1 and re.fullmatch(rf"key accepted \(security key: user presence, {counter}\)",
                                               accepted[0]), accepted
    assert re.fullmatch(rf"key accepted \(security key: user presence, {counter}\)",
                        reasons_for(home, keys["alice_ecdsa"], "success")[0])
    untouched = reasons_for(home, keys["alice_untouched"], "failure")
    assert len(untouched) == 1 and re.fullmatch(
        r"user presence not asserted \(the security key was not touched\) "
        rf"\(security key: neither user presence nor user verification, {counter}\)", untouched[0]), untouched
    assert re.fullmatch(rf"key accepted \(security key: neither user presence nor user verification, {counter}\)",
                        reasons_for(home, keys["carol"], "success")[0])
    assert re.fullmatch(r"user verification not asserted \(no PIN or biometric\) "
                        rf"\(security key: user presence, {counter}\)",
                        reasons_for(home, keys["dave_touch"], "failure")[0])
    assert re.fullmatch(rf"key accepted \(security key: user presence, user verification, {counter}\)",
                        reasons_for(home, keys["dave_pin"], "success")[0])
    assert reasons_for(home, keys["dave_plain"], "failure") == [
        "a security key is required (require_user_verification); ssh-ed25519 keys are refused, use one made by "
        "ssh-keygen -t ed25519-sk"]
    assert reasons_for(home, keys["erin_plain"], "failure") == [
        "a security key is required (require_security_key); ssh-ed25519 keys are refused, use one made by "
        "ssh-keygen -t ed25519-sk"]
    assert reasons_for(home, keys["erin"], "success")
    assert reasons_for(home, keys["frank"], "failure")[0].startswith("user verification not asserted")
    assert reasons_for(home, keys["bob"], "success") == ["key accepted"]
    assert not reasons_for(home, keys["bob"], "failure")


def test_certificates_of_security_keys(home, echo_server, tmp_path, provider):
    ca = keygen(tmp_path / "ca")
    touch = sk_keygen(provider, tmp_path / "erin_sk")
    untouched = sk_keygen(provider, tmp_path / "erin_untouched_sk", "no-touch-required")
    plain = keygen(tmp_path / "erin_plain")
    pin = sk_keygen(provider, tmp_path / "erin_pin_sk", "verify-required")

    def sign(key: Path, name: str, *options: str) -> Path:
        pub = tmp_path / f"{name}.pub"
        shutil.copy(f"{key}.pub", pub)
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", name, "-n", "erin", "-V", "-5m:+1h",
                        *[arg for option in options for arg in ("-O", option)], str(pub)],
                       check=True, capture_output=True)
        return tmp_path / f"{name}-cert.pub"

    certs = {"touch": sign(touch, "touch"), "plain": sign(plain, "plain"),
             "untouched": sign(untouched, "untouched"),
             "waived": sign(untouched, "waived", "no-touch-required"),
             "demanded": sign(touch, "demanded", "verify-required"), "verified": sign(pin, "verified", "verify-required")}
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[cas.corp]\nkey = "{line(ca)}"\n\n'
                      f'[users.erin]\nrequire_security_key = true\nallow = ["127.0.0.2:{echo_server}"]\n')
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr

    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port, provider, echo_server)
        assert client.run("erin", touch, "127.0.0.1", certs["touch"]).stdout == b"ping\n"
        assert client.run("erin", plain, "127.0.0.11", certs["plain"]).returncode == 255
        assert client.run("erin", untouched, "127.0.0.12", certs["untouched"]).returncode == 255
        waived = client.run("erin", untouched, "127.0.0.1", certs["waived"])
        assert waived.stdout == b"ping\n", waived.stderr
        assert client.run("erin", touch, "127.0.0.13", certs["demanded"]).returncode == 255
        verified = client.run("erin", pin, "127.0.0.1", certs["verified"])
        assert verified.stdout == b"ping\n", verified.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    rows = auth_rows(home)
    reasons = [(row["result"], row["reason"]) for row in rows if row["user"] == "erin"]
    text = "\n".join(f"{result}: {reason}" for result, reason in reasons)
    assert re.search(r"success: certificate accepted: key id touch serial \d+ CA SHA256:\S+ "
                     r"\(security key: user presence, counter \d+\)", text), text
    assert re.search(r"failure: certificate refused: a security key is required \(require_security_key\); "
                     r"ssh-ed25519 keys are refused, use one made by ssh-keygen -t ed25519-sk: key id plain", text), text
    assert re.search(r"failure: certificate refused: user presence not asserted \(the security key was not touched\) "
                     r"\(security key: neither user presence nor user verification, counter \d+\): key id untouched "
                     r"serial \d+ CA SHA256:", text), text
    assert re.search(r"success: certificate accepted: key id waived serial \d+ CA SHA256:\S+ \(security key: "
                     r"neither user presence nor user verification, counter \d+\)", text), text
    assert re.search(r"failure: certificate refused: user verification not asserted \(no PIN or biometric\) "
                     r"\(security key: user presence, counter \d+\): key id demanded serial \d+ CA SHA256:", text), text
    assert re.search(r"success: certificate accepted: key id verified serial \d+ CA SHA256:\S+ \(security key: "
                     r"user presence, user verification, counter \d+\)", text), text
