"""Revocation (#21) with the real `ssh-keygen -k` KRLs and `ssh-keygen -s` certificates, offered by the real OpenSSH
client to a real gateway on loopback: certificates revoked by KRL serial (list and range), by KRL key id, by the
policy's [revoked] list (serial per CA, key id), and plain keys revoked by a KRL key line or a policy fingerprint
are refused and audited with the certificate's columns; a KRL that cannot be read refuses every key and certificate
login until it reads again; rewriting the KRL, or applying a policy that revokes, ends a live session within about a
second. The audit CLI finds logins and sessions by --cert-serial and --key-id, and `audit verify` still passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_certificates import SSH, keygen, known_hosts, sign
from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")


def fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def make_krl(path: Path, ca: Path, *lines: str, version: int = 1) -> None:
    """`ssh-keygen -k` from a spec file, written next to `path` and moved over it (atomically, as advised)."""
    spec = path.with_suffix(".spec")
    spec.write_text("".join(f"{line}\n" for line in lines))
    new = path.with_name(path.name + ".new")
    new.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(new), "-s", f"{ca}.pub", "-z", str(version), str(spec)],
                   check=True, capture_output=True)
    os.replace(new, path)


def ssh_args(port: int, known: Path, key: Path, cert: Path | None, user: str, source: str, target: str) -> list[str]:
    extra = ["-o", f"CertificateFile={cert}"] if cert is not None else []
    return [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), *extra, "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-b", source, "-W", target,
            f"{user}@127.0.0.1"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=b"ping\n", capture_output=True, timeout=30)


def test_revoked_certificates_and_keys_are_refused_and_audited(home, echo_server, tmp_path):
    ca, key, bob_key, carol_key = tmp_path / "ca", tmp_path / "id", tmp_path / "bob", tmp_path / "carol"
    ca_line = keygen(ca, "ca@corp")
    keygen(key, "alice@laptop")
    keygen(bob_key, "bob@laptop")
    keygen(carol_key, "carol@laptop")
    for user, user_key in (("bob", bob_key), ("carol", carol_key)):
        assert bastion(home, "user", "add", user, "--key", f"{user_key}.pub").returncode == 0
    certs = tmp_path / "certs"
    certs.mkdir()
    made = {
        "krl_serial": sign(ca, key, certs / "krl_serial", serial=7),
        "krl_range": sign(ca, key, certs / "krl_range", serial=15),
        "krl_key_id": sign(ca, key, certs / "krl_key_id", serial=8, key_id="alice@old-laptop"),
        "policy_serial": sign(ca, key, certs / "policy_serial", serial=30),
        "policy_key_id": sign(ca, key, certs / "policy_key_id", serial=31, key_id="alice@stolen"),
        "valid": sign(ca, key, certs / "valid", serial=40, principals="alice,ops"),
    }
    krl = tmp_path / "revoked.krl"
    make_krl(krl, ca, "serial: 7", "serial: 10-20", "id: alice@old-laptop", Path(f"{bob_key}.pub").read_text().strip())
    config = home / "config.toml"
    config.write_text(config.read_text().replace("revoked_keys = []", f'revoked_keys = ["{krl}"]'))
    allow = f'allow = ["127.0.0.2:{echo_server}"]'
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[cas.corp]\nkey = "{ca_line}"\n\n[users.alice]\n{allow}\n\n[users.bob]\n{allow}\n\n'
                      f'[users.carol]\n{allow}\n\n'
                      f'[revoked]\nserials = {{ corp = [30] }}\nkey_ids = ["alice@stolen"]\n'
                      f'fingerprints = ["{fingerprint(Path(f"{carol_key}.pub"))}"]\n')
    applied = bastion(home, "policy", "apply", "--yes", str(policy))
    assert applied.returncode == 0, applied.stderr

    proc, port = start_serve(home)
    target = f"127.0.0.2:{echo_server}"
    try:
        known = known_hosts(home, port, tmp_path)
        ok = run(ssh_args(port, known, key, made["valid"], "alice", "127.0.0.1", target))
        assert ok.stdout == b"ping\n", ok.stderr
        refused = ["krl_serial", "krl_range", "krl_key_id", "policy_serial", "policy_key_id"]
        for number, name in enumerate(refused):  # each from its own source: failures from one get it penalized
            result = run(ssh_args(port, known, key, made[name], "alice", f"127.0.0.{30 + number}", target))
            assert result.returncode == 255 and b"Permission denied (publickey)" in result.stderr, name
        for number, (user, user_key) in enumerate((("bob", bob_key), ("carol", carol_key))):
            result = run(ssh_args(port, known, user_key, None, user, f"127.0.0.{40 + number}", target))
            assert result.returncode == 255 and b"Permission denied (publickey)" in result.stderr, user

        # a KRL that cannot be read refuses every key and certificate login, audited; readable again, they work
        good = krl.read_bytes()
        krl.write_bytes(b"SSHKRL\n\0garbage")
        time.sleep(2.2)
        broken = run(ssh_args(port, known, key, made["valid"], "alice", "127.0.0.50", target))
        assert broken.returncode == 255, broken.stderr
        doctor = bastion(home, "doctor")  # says so, as a problem (exit 1)
        assert doctor.returncode == 1 and f"PROBLEM  revoked   {krl}: " in doctor.stdout, doctor.stdout
        assert "the server refuses every key and certificate login while it cannot be read" in doctor.stdout
        krl.write_bytes(good)
        time.sleep(2.2)
        again = run(ssh_args(port, known, key, made["valid"], "alice", "127.0.0.51", target))
        assert again.stdout == b"ping\n", again.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    rows = json.loads(bastion(home, "audit", "auth", "--json").stdout)
    failures = {row["reason"]: row for row in rows if row["result"] == "failure"}

    def refused_with(text: str) -> dict:
        found = [row for reason, row in failures.items() if text in reason]
        assert found, (text, sorted(failures))
        return found[0]

    ca_fp = fingerprint(Path(f"{ca}.pub"))
    row = refused_with(f"certificate serial 7 revoked by {krl}")
    assert (row["cert_serial"], row["cert_key_id"], row["cert_ca"]) == (7, "alice@corp", ca_fp)
    assert refused_with(f"certificate serial 15 revoked by {krl}")["cert_serial"] == 15
    assert refused_with(f"certificate key id revoked by {krl}")["cert_key_id"] == "alice@old-laptop"
    assert refused_with("certificate serial 30 of CA corp revoked by the policy")["cert_serial"] == 30
    assert refused_with("certificate key id alice@stolen revoked by the policy")["cert_serial"] == 31
    assert refused_with(f"key revoked by {krl}")["user"] == "bob"
    carol = refused_with(f"key {fingerprint(Path(f'{carol_key}.pub'))} revoked by the policy")
    assert carol["user"] == "carol" and carol["cert_serial"] is None
    unreadable = refused_with("revoked keys cannot be checked")
    assert "refusing key and certificate logins" in unreadable["reason"] and unreadable["client_ip"] == "127.0.0.50"

    accepted = [row for row in rows if row["result"] == "success"]
    assert len(accepted) == 2 and all(row["cert_serial"] == 40 for row in accepted)
    assert accepted[0]["cert_principals"] == ["alice", "ops"] and accepted[0]["cert_ca"] == ca_fp
    assert accepted[0]["cert_valid_after"] < accepted[0]["cert_valid_before"]

    # the filters, through the real CLI
    by_serial = json.loads(bastion(home, "audit", "sessions", "--cert-serial", "40", "--json").stdout)
    assert len(by_serial) == 2 and {s["cert_key_id"] for s in by_serial} == {"alice@corp"}
    assert json.loads(bastion(home, "audit", "sessions", "--cert-serial", "41", "--json").stdout) == []
    by_key_id = json.loads(bastion(home, "audit", "auth", "--key-id", "alice@old-laptop", "--json").stdout)
    assert [r["cert_serial"] for r in by_key_id] == [8]
    assert json.loads(bastion(home, "audit", "auth", "--cert-serial", "7", "--denied", "--json").stdout)[0][
        "cert_key_id"] == "alice@corp"
    table = subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), "audit", "sessions", "--key-id",
                            "alice@corp"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})
    assert table.returncode == 0 and "alice@corp #40" in table.stdout, table.stdout
    shown = json.loads(bastion(home, "audit", "show", by_serial[0]["id"], "--json").stdout)
    assert shown["session"]["cert_serial"] == 40
    assert any("with certificate key id alice@corp serial 40" in entry["what"] for entry in shown["timeline"])
    csv = bastion(home, "audit", "sessions", "--cert-serial", "40", "--csv").stdout
    assert "cert_serial" in csv.splitlines()[0] and '"[""alice"", ""ops""]"' in csv
    followed = bastion(home, "audit", "follow", "--since", "1h", "--key-id", "alice@corp", "--cert-serial", "40",
                       "--limit", "6", "--jsonl")
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert len(events) == 6 and {e["table"] for e in events} == {"auth", "sessions", "channels"}, followed.stdout
    assert all(e["row"]["cert_serial"] == 40 for e in events if e["table"] != "channels")
    assert {e["row"]["session_id"] for e in events if e["table"] == "channels"} <= {s["id"] for s in by_serial}
    verified = bastion(home, "audit", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("intact"), verified.stdout


def _live(port: int, known: Path, key: Path, cert: Path | None, user: str, target: str) -> subprocess.Popen:
    live = subprocess.Popen(ssh_args(port, known, key, cert, user, "127.0.0.1", target),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    live.stdin.write(b"first\n")
    live.stdin.flush()
    assert live.stdout.readline() == b"first\n"
    return live


def _closed_within(live: subprocess.Popen, started: float, limit: float) -> float:
    try:
        live.wait(timeout=limit + 10)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    return time.monotonic() - started


def test_a_krl_rewrite_or_a_policy_revocation_ends_live_sessions(home, echo_server, tmp_path):
    """1. log in with a certificate (serial 50) and hold a -W tunnel 2. rewrite the KRL to revoke serial 50 3. the
    session ends within about a second (the file is looked at once a second). Then a plain key session ends when a
    policy apply revokes its fingerprint."""
    ca, key, dave_key = tmp_path / "ca", tmp_path / "id", tmp_path / "dave"
    ca_line = keygen(ca, "ca@corp")
    keygen(key, "alice@laptop")
    keygen(dave_key, "dave@laptop")
    assert bastion(home, "user", "add", "dave", "--key", f"{dave_key}.pub").returncode == 0
    cert = sign(ca, key, tmp_path / "alice", serial=50)
    krl = tmp_path / "revoked.krl"
    make_krl(krl, ca, "serial: 7")
    config = home / "config.toml"
    config.write_text(config.read_text().replace("revoked_keys = []", f'revoked_keys = ["{krl}"]'))
    allow = f'allow = ["127.0.0.2:{echo_server}"]'
    policy = tmp_path / "policy.toml"
    base = f'[cas.corp]\nkey = "{ca_line}"\n\n[users.alice]\n{allow}\n\n[users.dave]\n{allow}\n'
    policy.write_text(base)
    assert bastion(home, "policy", "apply", "--yes", str(policy)).returncode == 0
    proc, port = start_serve(home)
    target = f"127.0.0.2:{echo_server}"
    latencies = []
    try:
        known = known_hosts(home, port, tmp_path)
        for _ in range(3):
            make_krl(krl, ca, "serial: 7", version=1)
            time.sleep(1.5)  # the unrevoking KRL is in force
            live = _live(port, known, key, cert, "alice", target)
            make_krl(krl, ca, "serial: 7", "serial: 50", version=2)
            latencies.append(_closed_within(live, time.monotonic(), 3))
        live = _live(port, known, dave_key, None, "dave", target)
        policy.write_text(base + f'\n[revoked]\nfingerprints = ["{fingerprint(Path(f"{dave_key}.pub"))}"]\n')
        started = time.monotonic()
        result = bastion(home, "policy", "apply", "--yes", str(policy))
        cli = time.monotonic() - started  # the CLI's own run: Python start, plan, apply, telling the server
        applied = _closed_within(live, started, 5)
        assert result.returncode == 0, result.stderr
        dave_fp = fingerprint(Path(f"{dave_key}.pub"))
        assert f"  - revoked: key {dave_fp}" in result.stdout  # the plan names it, and the session it ends
        assert f"would close: key {dave_fp} revoked by the policy" in result.stdout, result.stdout

        # SIGHUP: a second file named in the config is read, and what it revokes ends a live session
        other = tmp_path / "more.krl"
        make_krl(other, ca, "serial: 60")
        second = _live(port, known, key, sign(ca, key, tmp_path / "alice60", serial=61), "alice", target)
        config.write_text(config.read_text().replace(f'revoked_keys = ["{krl}"]', f'revoked_keys = ["{krl}", "{other}"]'))
        make_krl(other, ca, "serial: 60-61")
        proc.send_signal(signal.SIGHUP)
        reloaded = _closed_within(second, time.monotonic(), 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    print(f"KRL rewrite to session closed: {', '.join(f'{s * 1000:.0f} ms' for s in latencies)}; "
          f"policy apply to session closed: {applied * 1000:.0f} ms (the CLI ran {cli * 1000:.0f} ms); SIGHUP to session closed: {reloaded * 1000:.0f} ms")
    assert max(latencies) < 2.5  # a look a second, a re-check, the disconnect
    sessions = json.loads(bastion(home, "audit", "sessions", "--json").stdout)
    ended = [s["end_reason"] for s in sessions if s["cert_serial"] == 50]
    assert len(ended) == 3 and all(r == f"certificate serial 50 revoked by {krl}" for r in ended), ended
    dave = [s for s in sessions if s["user"] == "dave"]
    assert dave[0]["end_reason"].endswith("revoked by the policy") and dave[0]["cert_serial"] is None
    assert [s["end_reason"] for s in sessions if s["cert_serial"] == 61] == [f"certificate serial 61 revoked by {other}"]
    assert bastion(home, "audit", "verify").returncode == 0
