"""Revocation (#21): the KRL parser (policy/krl.py) against files made by the real `ssh-keygen -k`, with the real
`ssh-keygen -Q` as the oracle; hand-built sections ssh-keygen cannot make (any CA, signatures, extensions); hostile
bytes (one error type, never another exception); the text form of revoked_keys; the policy's [revoked] list (FILE:LINE
errors, round trips, the store); the combined refusal; the audit chain across migration 7 (old rows still verify)."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policy.file import PolicyFileError, parse_policy, policy_from_dict, policy_to_dict, to_toml
from bastion.policy.krl import ANY_CA, Credential, KrlError, RevocationList, fingerprint, parse_krl
from bastion.policy.model import RevokedList
from bastion.policy.revocation import (
    RevokedKeyFiles,
    parse_revoked_keys,
    policy_revocation,
    revocation_refusal,
)


def keygen(path: Path) -> bytes:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return blob_of(Path(f"{path}.pub"))


def blob_of(pub: Path) -> bytes:
    return base64.b64decode(pub.read_text().split()[1])


def krl_of(tmp_path: Path, lines: list[str], ca: Path | None = None, version: int | None = None) -> bytes:
    spec = tmp_path / "spec"
    spec.write_text("".join(f"{line}\n" for line in lines))
    out = tmp_path / "out.krl"
    out.unlink(missing_ok=True)
    args = ["ssh-keygen", "-q", "-k", "-f", str(out)]
    if ca is not None:
        args += ["-s", f"{ca}.pub"]
    if version is not None:
        args += ["-z", str(version)]
    subprocess.run([*args, str(spec)], check=True, capture_output=True)
    return out.read_bytes()


def certify(tmp_path: Path, ca: Path, key: Path, serial: int, key_id: str) -> Path:
    pub = tmp_path / f"c{serial}-{abs(hash(key_id))}.pub"
    pub.write_bytes(Path(f"{key}.pub").read_bytes())
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", key_id, "-z", str(serial), "-n", "alice", str(pub)],
                   check=True, capture_output=True)
    return pub.with_name(pub.stem + "-cert.pub")


def ssh_keygen_says_revoked(krl: Path, pub: Path) -> bool:
    """The oracle: `ssh-keygen -Q -f KRL FILE` exits 1 and says REVOKED for a revoked key or certificate."""
    result = subprocess.run(["ssh-keygen", "-Q", "-f", str(krl), str(pub)], capture_output=True, text=True)
    return "REVOKED" in result.stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    made = {name: base / name for name in ("ca", "other_ca", "alice", "bob")}
    blobs = {name: keygen(path) for name, path in made.items()}
    return base, made, blobs


# ---- files made by ssh-keygen -k ------------------------------------------------------------------------------------

def test_serials_lists_ranges_bitmaps_and_key_ids_agree_with_ssh_keygen(keys, tmp_path):
    base, made, blobs = keys
    # ssh-keygen picks the encoding: 7, 100, 102, 103, 105 close together become a bitmap, 10-20 a range,
    # 5000000 a list
    data = krl_of(tmp_path, ["serial: 7", "serial: 10-20", "serial: 100", "serial: 102-103", "serial: 105",
                             "serial: 5000000", "id: alice@old"], ca=made["ca"], version=42)
    assert data[8 + 4 + 8 + 8:8 + 4 + 8 + 8 + 8] == b"\0" * 8  # flags
    krl = parse_krl(data)
    assert krl.krl_version == 42 and krl.generated_date > 1_700_000_000
    section = krl.certificates[fingerprint(blobs["ca"])]
    assert section.ranges == ((7, 7), (10, 20), (100, 100), (102, 103), (105, 105), (5000000, 5000000))
    assert section.key_ids == frozenset({b"alice@old"})
    path = tmp_path / "the.krl"
    path.write_bytes(data)
    for serial, key_id in [(7, "x"), (8, "x"), (10, "x"), (20, "x"), (21, "x"), (101, "x"), (103, "x"), (104, "x"),
                           (5000000, "x"), (4999999, "x"), (9, "alice@old"), (9, "alice@old2")]:
        cert = certify(tmp_path, made["ca"], made["alice"], serial, key_id)
        ours = krl.revokes(Credential(blobs["alice"], blobs["ca"], serial, key_id)) is not None
        assert ours == ssh_keygen_says_revoked(path, cert), (serial, key_id)
        # the same serials signed by another CA are not this CA's to revoke
        other = certify(tmp_path, made["other_ca"], made["alice"], serial, key_id)
        assert krl.revokes(Credential(blobs["alice"], blobs["other_ca"], serial, key_id)) is None
        assert not ssh_keygen_says_revoked(path, other)
    assert krl.revokes(Credential(blobs["alice"], blobs["ca"], 7, "x")) == "certificate serial 7 revoked"
    assert krl.revokes(Credential(blobs["alice"], blobs["ca"], 9, "alice@old")) == "certificate key id revoked"
    assert krl.revokes(Credential(blobs["alice"])) is None  # a plain key is not a certificate


def test_keys_and_hashes_revoke_plain_keys_their_certificates_and_a_cas_certificates(keys, tmp_path):
    base, made, blobs = keys
    line = {name: Path(f"{path}.pub").read_text().strip() for name, path in made.items()}
    data = krl_of(tmp_path, [line["alice"], f"sha1: {line['bob']}", f"sha256: {line['other_ca']}"])
    krl = parse_krl(data)
    assert krl.keys == {blobs["alice"]} and krl.sha1 == {hashlib.sha1(blobs["bob"]).digest()}
    assert krl.sha256 == {hashlib.sha256(blobs["other_ca"]).digest()}
    assert krl.revokes(Credential(blobs["alice"])) == "key revoked"
    assert krl.revokes(Credential(blobs["bob"])) == "key revoked (by SHA1 hash)"
    assert krl.revokes(Credential(blobs["ca"])) is None
    # a certificate of a revoked key is revoked; so is every certificate a revoked CA key signed (krl.c checks
    # the certificate's signature key too)
    assert krl.revokes(Credential(blobs["alice"], blobs["ca"], 3, "a")) == "key revoked"
    assert krl.revokes(Credential(blobs["ca"], blobs["other_ca"], 3, "a")) == "CA key revoked (by SHA256 hash)"
    path = tmp_path / "keys.krl"
    path.write_bytes(data)
    assert ssh_keygen_says_revoked(path, certify(tmp_path, made["other_ca"], made["ca"], 3, "a"))
    assert ssh_keygen_says_revoked(path, certify(tmp_path, made["ca"], made["alice"], 3, "a"))
    assert not ssh_keygen_says_revoked(path, certify(tmp_path, made["ca"], made["ca"], 3, "a"))


def test_serial_zero_is_never_revoked_by_serial(keys):
    _, _, blobs = keys
    krl = RevocationList(certificates={fingerprint(blobs["ca"]): parse_krl(_krl(_cert_section(
        blobs["ca"], (0x21, struct.pack(">QQ", 1, 2**64 - 1))))).certificates[fingerprint(blobs["ca"])]})
    assert krl.revokes(Credential(blobs["alice"], blobs["ca"], 0, "x")) is None
    assert krl.revokes(Credential(blobs["alice"], blobs["ca"], 2**64 - 1, "x")) is not None


# ---- sections ssh-keygen does not make ------------------------------------------------------------------------------

def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _krl(*sections: bytes, version: int = 1) -> bytes:
    return (b"SSHKRL\n\0" + struct.pack(">IQQQ", version, 3, 1_800_000_000, 0) + _string(b"") + _string(b"comment")
            + b"".join(sections))


def _section(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _string(body)


def _cert_section(ca: bytes, *subsections: tuple[int, bytes]) -> bytes:
    return _section(1, _string(ca) + _string(b"") + b"".join(_section(k, body) for k, body in subsections))


def test_the_any_ca_section_revokes_key_ids_of_every_ca(keys):
    _, _, blobs = keys
    krl = parse_krl(_krl(_cert_section(b"", (0x23, _string(b"mallory@corp")), (0x20, struct.pack(">Q", 9)))))
    assert set(krl.certificates) == {ANY_CA} and krl.comment == "comment"
    assert krl.revokes(Credential(blobs["alice"], blobs["ca"], 1, "mallory@corp")) == \
        "certificate key id revoked (for any CA)"
    assert krl.revokes(Credential(blobs["alice"], blobs["other_ca"], 9, "x")) == "certificate serial 9 revoked"


def test_signature_sections_are_skipped_as_sshd_skips_them(keys):
    _, _, blobs = keys
    signed = _krl(_cert_section(blobs["ca"], (0x20, struct.pack(">Q", 5))),
                  bytes([4]) + _string(blobs["other_ca"]) + _string(b"not checked"))
    krl = parse_krl(signed)
    assert krl.revokes(Credential(blobs["alice"], blobs["ca"], 5, "x")) is not None
    with pytest.raises(KrlError, match="truncated"):  # the signature string itself must be there
        parse_krl(_krl(bytes([4]) + _string(blobs["other_ca"])))


def test_extensions_critical_refuse_others_are_skipped(keys):
    _, _, blobs = keys
    optional = _section(255, _string(b"x@example.com") + b"\0" + _string(b"data"))
    assert parse_krl(_krl(optional)).keys == frozenset()
    critical = _section(255, _string(b"x@example.com") + b"\1" + _string(b""))
    with pytest.raises(KrlError, match="unsupported critical extension 'x@example.com'"):
        parse_krl(_krl(critical))
    sub = _cert_section(blobs["ca"], (0x39, _string(b"y@example.com") + b"\1" + _string(b"")))
    with pytest.raises(KrlError, match="critical extension"):
        parse_krl(_krl(sub))


@pytest.mark.parametrize("data, problem", [
    (b"", "no SSHKRL magic"),
    (b"SSHKRL\n\0" + struct.pack(">I", 2), "format version 2"),
    (_krl(_section(6, b"")), "unsupported type 6"),
    (_krl(_section(3, _string(b"short"))), "5 bytes, expected 20"),
    (_krl(_section(5, _string(b"x" * 20))), "expected 32"),
    (_krl(_section(2, _string(b"key") + b"!")), "truncated"),
    (_krl(_cert_section(b"\0\0\0\1x", (0x20, struct.pack(">Q", 0)))), "invalid serial range 0-0"),
    (_krl(_cert_section(b"", (0x21, struct.pack(">QQ", 9, 3)))), "invalid serial range 9-3"),
    (_krl(_cert_section(b"", (0x22, struct.pack(">Q", 1) + _string(b"\x80")))), "negative"),
    (_krl(_cert_section(b"", (0x22, struct.pack(">Q", 1) + _string(b"\1" * 2049)))), "longer than 16384 bits"),
    (_krl(_cert_section(b"", (0x22, struct.pack(">Q", 2**64 - 1) + _string(b"\3")))), "wraps"),
    (_krl(_cert_section(b"", (0x23, _string(b"a\0b")))), "NUL"),
    (_krl(_cert_section(b"", (0x24, b""))), "unsupported certificate subsection type 0x24"),
    (_krl(_cert_section(b"", (0x20, b"\0\0\0"))), "truncated"),
    (_krl(_cert_section(b"\0\0\0\0")), "not an SSH public key blob"),
    (_krl(_section(1, _string(b"") + _string(b"") + b"\x20")), "truncated"),
])
def test_malformed_krls_are_refused_with_a_reason(data, problem):
    with pytest.raises(KrlError, match=problem):
        parse_krl(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_hostile_bytes_raise_only_krl_error(data):
    for candidate in (data, b"SSHKRL\n\0" + data, _krl() + data):
        try:
            krl = parse_krl(candidate)
        except KrlError as exc:
            assert str(exc).isprintable() and len(str(exc)) < 300
            continue
        krl.revokes(Credential(b"\0\0\0\x0bssh-ed25519", b"\0\0\0\x0bssh-ed25519", 7, "id"))


section_kinds = st.sampled_from([0x20, 0x21, 0x22, 0x23, 0x39, 0x24])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(section_kinds, st.binary(max_size=40)), max_size=6), st.booleans(),
       st.integers(0, 2**64 - 1), st.text(max_size=20))
def test_hostile_certificate_sections_raise_only_krl_error(subsections, any_ca, serial, key_id):
    ca = b"" if any_ca else b"\0\0\0\x0bssh-ed25519" + _string(b"k" * 32)
    try:
        krl = parse_krl(_krl(_cert_section(ca, *subsections)))
    except KrlError:
        return
    reason = krl.revokes(Credential(b"key", ca or b"\0\0\0\1x", serial, key_id))
    assert reason is None or reason.isprintable()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**64 - 2**20), st.integers(0, 2**200))
def test_bitmaps_revoke_exactly_their_bits(offset, bits):
    body = bits.to_bytes((bits.bit_length() + 8) // 8, "big")  # a leading zero keeps the mpint positive
    try:
        krl = parse_krl(_krl(_cert_section(b"", (0x22, struct.pack(">Q", offset) + _string(body)))))
    except KrlError:
        assert offset + bits.bit_length() - 1 > 2**64 - 1 or len(body) > 2049
        return
    section = krl.certificates[ANY_CA]
    for index in range(0, 210, 7):
        assert section.serial_revoked(offset + index) == bool(bits >> index & 1)


# ---- the text form and the combined refusal --------------------------------------------------------------------------

def test_revoked_keys_as_a_text_list_of_public_keys(keys):
    base, made, blobs = keys
    text = "# revoked\n\n" + Path(f"{made['alice']}.pub").read_text()
    assert parse_revoked_keys(text.encode()).revokes(Credential(blobs["alice"])) == "key revoked"
    with pytest.raises(KrlError, match="line 2 is not an OpenSSH public key"):
        parse_revoked_keys(b"# ok\nnonsense here\n")
    with pytest.raises(KrlError, match="not ASCII"):
        parse_revoked_keys("ssh-ed25519 é".encode())


def test_revocation_refusal_reads_files_then_the_policy_and_fails_closed(keys):
    _, _, blobs = keys
    ca_line = f"ssh-ed25519 {base64.b64encode(blobs['ca']).decode()} ca"
    policy = parse_policy(f'[cas.corp]\nkey = "{ca_line}"\n\n[revoked]\nserials = {{ corp = [30, "40-50"] }}\n'
                          f'key_ids = ["alice@stolen"]\nfingerprints = ["{fingerprint(blobs["bob"])}"]\n')
    files = RevokedKeyFiles(lists=(("/etc/krl", RevocationList(keys=frozenset({blobs["other_ca"]}))),))
    cert = lambda serial, key_id="a": Credential(blobs["alice"], blobs["ca"], serial, key_id)  # noqa: E731
    assert revocation_refusal(policy, files, cert(29)) is None
    assert revocation_refusal(policy, files, cert(45)) == "certificate serial 45 of CA corp revoked by the policy"
    assert revocation_refusal(policy, files, cert(1, "alice@stolen")) == \
        "certificate key id alice@stolen revoked by the policy"
    assert revocation_refusal(policy, files, Credential(blobs["bob"])) == \
        f"key {fingerprint(blobs['bob'])} revoked by the policy"
    assert revocation_refusal(policy, files, Credential(blobs["other_ca"])) == "key revoked by /etc/krl"
    # serials are per CA: another CA's serial 45 is not revoked by corp's list
    assert policy_revocation(policy, Credential(blobs["alice"], blobs["other_ca"], 45, "a")) is None
    broken = RevokedKeyFiles(failure="/etc/krl: cannot read: Permission denied")
    assert revocation_refusal(policy, broken, cert(29)).startswith("revoked keys cannot be checked (/etc/krl")
    assert revocation_refusal(policy, broken, cert(29), live=True) is None  # not a reason to end live sessions


# ---- [revoked] in policy files ---------------------------------------------------------------------------------------

FINGERPRINT = "SHA256:daX5lZdAtVsP+x16eu3r61Xs190g+skSClE/bWC+L1g"


def test_the_revoked_table_round_trips():
    text = (f'[revoked]\nserials = {{ corp = [7, "10-20", "18446744073709551615"] }}\nkey_ids = ["alice@old"]\n'
            f'fingerprints = ["{FINGERPRINT}"]\n')
    policy = parse_policy(text)
    assert policy.revoked == RevokedList(serials=(("corp", 7, 7), ("corp", 10, 20),
                                                  ("corp", 2**64 - 1, 2**64 - 1)),
                                         key_ids=("alice@old",), fingerprints=(FINGERPRINT,))
    data = policy_to_dict(policy)
    assert policy_from_dict(data) == policy and parse_policy(to_toml(data)) == policy
    assert "revoked" not in policy_to_dict(parse_policy("[users.alice]\n"))  # absent when empty


@pytest.mark.parametrize("text, message", [
    ("[revoked]\nserials = { corp = [0] }\n", "f.toml:2: revoked.serials.corp: serial range 0-0 is outside"),
    ('[revoked]\nserials = { corp = ["20-10"] }\n', "f.toml:2: revoked.serials.corp: serial range 20-10"),
    ('[revoked]\nserials = { corp = ["x"] }\n', "not a number or a \"LOW-HIGH\" range"),
    ("[revoked]\nserials = { corp = 7 }\n", "must be a list"),
    ("[revoked]\nserials = [7]\n", "f.toml:2: revoked.serials must be a table of CA names"),
    ('[revoked]\nserials = { "Bad CA" = [1] }\n', "CA name 'Bad CA' is not valid"),
    ("[revoked]\n\nkey_ids = [1]\n", "f.toml:3: revoked.key_ids must be a list"),
    ('[revoked]\nfingerprints = ["MD5:00"]\n', "f.toml:2: revoked.fingerprints: fingerprint 'MD5:00' is not"),
    ("[revoked]\nserial = [1]\n", "revoked has unknown key 'serial'; allowed keys are serials, key_ids"),
    ("revoked = 1\n", "f.toml:1: revoked must be a table"),
])
def test_revoked_table_errors_name_the_line(text, message):
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text, "f.toml")
    assert message in str(caught.value)


def test_the_store_keeps_the_revoked_list_as_declared_state(tmp_path):
    from bastion.store.sqlite import Store
    from bastion.store.sqlite import PolicyRefused
    store = Store(tmp_path / "b.db")
    ca = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz ca@corp"
    policy = parse_policy(f'[cas.corp]\nkey = "{ca}"\n\n[revoked]\nserials = {{ corp = [7, "10-20"], home = [3] }}\n'
                          f'fingerprints = ["{FINGERPRINT}"]\n')
    store.apply_policy(policy)
    assert store.load_policy()[1].revoked == policy.revoked
    with pytest.raises(PolicyRefused, match="revoked.serials names unknown CA 'corp'"):  # a typo revokes nothing
        store.apply_policy(parse_policy('[revoked]\nserials = { corp = [7] }\n'))
    store.apply_policy(parse_policy('[revoked]\nkey_ids = ["x"]\n'))
    assert store.load_policy()[1].revoked == RevokedList(key_ids=("x",))
    store.apply_policy(parse_policy(""))
    assert not store.load_policy()[1].revoked


# ---- the audit chain across migration 7 ----------------------------------------------------------------------------

def test_rows_written_before_migration_7_still_verify_and_new_ones_carry_the_certificate(tmp_path):
    import asyncio
    from datetime import datetime, timezone

    from bastion.audit.chain import append, read_head, verify_database
    from bastion.audit.query import open_reader, select
    from bastion.audit.filters import Filters
    from bastion.audit.writer import AuditLog, SessionRecord
    from bastion.policy.certificates import Certificate
    from bastion.store.schema import MIGRATIONS, connect
    from bastion.store.sqlite import Store

    path = tmp_path / "b.db"
    conn = connect(path)
    for number, script in enumerate(MIGRATIONS[:6], start=1):  # a database as the release before made it
        conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    conn.close()
    cert = Certificate(key_id="alice@corp", serial=2**64 - 2, user_certificate=True, principals=("alice", "o,ps"),
                       valid_after=1_700_000_000, valid_before=2**64 - 1, ca_fingerprint="SHA256:ca")
    started = datetime(2026, 12, 1, tzinfo=timezone.utc)

    async def write(with_cert: bool, session: str) -> None:
        audit = AuditLog(path)
        audit.start()
        audit.record_auth("alice", "127.0.0.1", 1, "publickey", "SHA256:k", "success", "ok",
                          certificate=cert if with_cert else None)
        await audit.open_session(SessionRecord(session, "alice", "127.0.0.1", 1, "SHA256:k", "OpenSSH", started,
                                               certificate=cert if with_cert else None))
        audit.end_session(session, "client disconnected", 1, 2)
        await audit.flush()
        audit.stop()

    # a row of the old schema, chained as the old writer chained it: its payload has no certificate columns
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO sessions (id, user, client_ip, client_port, key_fingerprint, client_version, "
                    "started_at) VALUES ('old', 'alice', '127.0.0.1', 1, 'SHA256:k', 'OpenSSH', '2026-11-30')")
    with sqlite3.connect(path) as raw:
        head = read_head(raw)
        state = dict(zip([d[0] for d in raw.execute("SELECT * FROM sessions").description],
                         raw.execute("SELECT * FROM sessions").fetchone()))
        append(raw, head, "2026-11-30T00:00:00.000Z", "insert", "sessions", "old", state)
    Store(path).close()  # migrates to 7
    asyncio.run(write(True, "new"))
    asyncio.run(write(False, "plain"))
    with sqlite3.connect(path) as raw:
        report = verify_database(raw)
    assert report.intact, report.problems
    reader = open_reader(path)
    rows = {row["id"]: row for row in select(reader, "sessions", Filters())}
    assert rows["old"]["cert_serial"] is None and rows["plain"]["cert_key_id"] is None
    assert rows["new"]["cert_serial"] == 2**64 - 2 and rows["new"]["cert_principals"] == ["alice", "o,ps"]
    assert rows["new"]["cert_valid_before"] == "forever" and rows["new"]["cert_valid_after"].startswith("2023-11-14")
    assert [r["id"] for r in select(reader, "sessions", Filters(cert_serial=2**64 - 2))] == ["new"]
    assert [r["result"] for r in select(reader, "auth", Filters(key_id="alice@corp"))] == ["success"]
    reader.close()
    with sqlite3.connect(path) as raw:  # an edit to a certificate column of an old row shows
        raw.execute("UPDATE sessions SET cert_serial = '5' WHERE id = 'old'")
        assert not verify_database(raw).intact
