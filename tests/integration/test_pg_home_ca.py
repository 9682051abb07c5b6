"""The home CA in a fleet on one PostgreSQL store (#22, #21's `bastion ca`): a real throwaway PostgreSQL, real
`bastion serve` nodes on loopback and the real OpenSSH client. A certificate signed on node A's home logs in on
node B, which never saw the private key; another node cannot make a second CA nor sign; concurrent signers (two
homes holding the key) never share a serial; `store copy` carries a single node's CA and its last serial."""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from testbed.pg_store import pg_store_url, pg_url, postgres, migrated  # noqa: F401 (fixtures)
from tests.integration.test_pg_store import Node, echo_server, grant, keygen, make_home, ok  # noqa: F401
from tests.integration.test_serve_loopback import bastion

SERIAL = re.compile(r"serial (\d+),")


def sign(home: Path, key: Path, out: Path) -> subprocess.CompletedProcess:
    return bastion(home, "ca", "sign", "alice", "--key", f"{key}.pub", "--valid", "1h", "-o", str(out))


def serial_of(signed: subprocess.CompletedProcess) -> int:
    found = SERIAL.search(signed.stderr)
    assert found, signed.stderr
    return int(found.group(1))


def cert_login(node: Node, key: Path, cert: Path, port: int) -> subprocess.CompletedProcess:
    """alice logs in with her key's certificate only (the store knows no key of hers)."""
    return subprocess.run([*node.base, "-o", f"CertificateFile={cert}", "-W", f"127.0.0.2:{port}",
                           "alice@127.0.0.1"], input=b"hello\n", capture_output=True, timeout=30)


def test_a_certificate_signed_on_one_node_logs_in_on_another(pg_store_url, tmp_path, echo_server):  # noqa: F811
    node_a = make_home(tmp_path / "a", store=pg_store_url)
    node_b = make_home(tmp_path / "b", store=pg_store_url)
    ok(bastion(node_a, "policy", "apply", str(grant(tmp_path, echo_server, True))))  # alice: no key, a grant
    made = ok(bastion(node_a, "ca", "init"))
    assert "made and published in the store" in made.stdout
    fingerprint = made.stdout.split("fingerprint ")[1].split()[0]
    # one CA per fleet: B cannot make its own, and says where the key is
    second = bastion(node_b, "ca", "init")
    assert second.returncode != 0 and "its private key is in " in second.stderr
    assert str(node_a.resolve()) in second.stderr and "Traceback" not in second.stderr
    assert not (node_b / "user_ca_key").exists()
    assert "already the fleet's home CA" in ok(bastion(node_a, "ca", "init")).stdout
    alice = keygen(tmp_path / "alice")
    refused = sign(node_b, alice, tmp_path / "b-cert.pub")
    assert refused.returncode != 0 and "is not in this home" in refused.stderr
    assert str(node_a.resolve()) in refused.stderr and not (tmp_path / "b-cert.pub").exists()

    node = Node(node_b, alice, tmp_path)  # started after the CA was made ...
    try:
        cert = tmp_path / "alice-cert.pub"
        assert serial_of(ok(sign(node_a, alice, cert))) == 1
        logged_in = cert_login(node, alice, cert, echo_server)
        assert logged_in.stdout == b"hello\n", logged_in.stderr
    finally:
        node.stop()
    rows = [row for row in json.loads(ok(bastion(node_b, "audit", "auth", "--json")).stdout)
            if row["result"] == "success"]
    assert [(row["user"], str(row["cert_serial"]), row["cert_ca"]) for row in rows] == [("alice", "1", fingerprint)], rows


def test_a_ca_made_while_a_node_runs_is_trusted_there_at_once(pg_store_url, tmp_path, echo_server):  # noqa: F811
    """`ca init` is a change of the store like a policy apply: a running node that never saw the key hears of it."""
    node_a = make_home(tmp_path / "a", store=pg_store_url)
    node_b = make_home(tmp_path / "b", store=pg_store_url)
    ok(bastion(node_a, "policy", "apply", str(grant(tmp_path, echo_server, True))))
    alice = keygen(tmp_path / "alice")
    node = Node(node_b, alice, tmp_path)
    try:
        ok(bastion(node_a, "ca", "init"))
        cert = tmp_path / "alice-cert.pub"
        ok(sign(node_a, alice, cert))
        logged_in = cert_login(node, alice, cert, echo_server)
        assert logged_in.stdout == b"hello\n", logged_in.stderr
    finally:
        node.stop()


def test_concurrent_signers_never_share_a_serial(pg_store_url, tmp_path):  # noqa: F811
    """Two homes hold the CA key (an operator copied it for a second signer): only the store's row orders their
    serials. Eight signings at once from each: sixteen serials, all different, none reused after."""
    node_a = make_home(tmp_path / "a", store=pg_store_url)
    node_c = make_home(tmp_path / "c", store=pg_store_url)
    ok(bastion(node_a, "ca", "init"))
    for name in ("user_ca_key", "user_ca_key.pub"):
        (node_c / name).write_bytes((node_a / name).read_bytes())
        (node_c / name).chmod(0o600 if name == "user_ca_key" else 0o644)
    alice = keygen(tmp_path / "alice")
    jobs = [(home, tmp_path / f"cert-{home.name}-{n}.pub") for n in range(8) for home in (node_a, node_c)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        signed = list(pool.map(lambda job: sign(job[0], alice, job[1]), jobs))
    serials = [serial_of(ok(done)) for done in signed]
    assert sorted(serials) == list(range(1, 17)), serials  # each once
    for (home, cert), serial in zip(jobs, serials):
        listed = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True, check=True)
        assert f"Serial: {serial}\n" in listed.stdout  # the certificate carries the serial reported
    # a serial at or below the fleet's last is refused, even where this home's own file is behind
    (node_c / "user_ca_key.serial").write_text("3\n")
    low = bastion(node_c, "ca", "sign", "alice", "--key", f"{alice}.pub", "--valid", "1h", "--serial", "10")
    assert low.returncode != 0 and "not above the last serial issued in the fleet (16)" in low.stderr
    assert serial_of(ok(sign(node_c, alice, tmp_path / "next.pub"))) == 17


def test_store_copy_carries_the_home_ca_and_its_last_serial(postgres, tmp_path, echo_server):  # noqa: F811
    """A single node that signed on SQLite moves to PostgreSQL: its CA is trusted by a new node, its old
    certificates log in there, and the next serial follows the last one it issued."""
    single = make_home(tmp_path / "single")
    ok(bastion(single, "policy", "apply", str(grant(tmp_path, echo_server, True))))
    ok(bastion(single, "ca", "init"))
    alice = keygen(tmp_path / "alice")
    old_certs = [tmp_path / f"old-{n}.pub" for n in range(3)]
    assert [serial_of(ok(sign(single, alice, cert))) for cert in old_certs] == [1, 2, 3]
    url = migrated(postgres.new_database("copy_ca"))
    copied = ok(bastion(single, "store", "copy", "--to", url))
    assert "home CA SHA256:" in copied.stdout and "serials go on after 3" in copied.stdout
    config = single / "config.toml"
    config.write_text(re.sub(r'(?m)^store = ".*"$', f'store = "{url}"', config.read_text()))
    assert serial_of(ok(sign(single, alice, tmp_path / "new.pub"))) == 4  # from the store's counter
    assert postgres.sql("copy_ca", "SELECT last_serial FROM home_ca")[0][0] == 4
    other = make_home(tmp_path / "other", store=url)
    node = Node(other, alice, tmp_path)
    try:
        for cert in (old_certs[0], tmp_path / "new.pub"):
            logged_in = cert_login(node, alice, cert, echo_server)
            assert logged_in.stdout == b"hello\n", logged_in.stderr
    finally:
        node.stop()
    # a store that already holds a CA is not a copy's target, unless --force (its serials stay used)
    again = bastion(single, "store", "copy", "--to", url)
    assert again.returncode != 0 and "1 home CA" in again.stderr
    assert "serials go on after 4" in ok(bastion(single, "store", "copy", "--to", url, "--force")).stdout


def test_a_node_without_the_key_shows_the_fleets_ca_in_policy_show_and_doctor(pg_store_url, tmp_path):  # noqa: F811
    """What `policy show` and `doctor` print is what the node's logins are decided by: on a node that never saw the
    private key, the fleet's home CA from the store, trusted as CA home."""
    node_a = make_home(tmp_path / "a", store=pg_store_url)
    node_b = make_home(tmp_path / "b", store=pg_store_url)
    assert "[cas.home]" not in ok(bastion(node_b, "policy", "show")).stdout
    made = ok(bastion(node_a, "ca", "init"))
    fingerprint = made.stdout.split("fingerprint ")[1].split()[0]
    public_key = " ".join((node_a / "user_ca_key.pub").read_text().split()[:2])
    shown = ok(bastion(node_b, "policy", "show")).stdout
    assert "[cas.home]" in shown and public_key in shown, shown
    doctor = bastion(node_b, "doctor")
    assert f"{fingerprint} (the fleet's, from the store; its private key is in another home) trusted as CA home" \
        in doctor.stdout, doctor.stdout
    assert "Traceback" not in doctor.stderr
