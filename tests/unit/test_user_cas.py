"""User certificate authorities (#21): the [cas.NAME] policy tables (FILE:LINE errors, the JSON and TOML round
trips, the store's declared state, the diff) and the pure certificate checks of policy/certificates.py."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.policy.certificates import (
    Certificate,
    certificate_key_options,
    certificate_refusal,
    certificate_session_refusal,
    describe_certificate,
    key_fingerprint,
    read_certificate_blob,
    trusted_authority,
    unreadable_refusal,
)
from bastion.policy.diff import policy_diff
from bastion.policy.file import PolicyFileError, parse_policy, policy_from_dict, policy_to_dict, to_toml
from bastion.policy.model import CertAuthority, Policy, UserPolicy
from bastion.store.sqlite import Store

# ssh-keygen -t ed25519 -C ca@corp; its fingerprint as `ssh-keygen -l` prints it
CA_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz ca@corp"
OTHER_KEY = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOsq8u9iSrct0"
             "8jVcTAmzCzJNxWX8Js/HZb2+nk/uJtD0TXcGAKgqji8c+EKLobuFQ3gEvOeuAwfzfiON/CIkCU=")
UTC = timezone.utc
NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
HERE = ip_address("127.0.0.1")


def ca_fingerprint(tmp_path, line: str) -> str:
    path = tmp_path / "ca.pub"
    path.write_text(line + "\n")
    return subprocess.run(["ssh-keygen", "-l", "-f", path], capture_output=True, text=True, check=True).stdout.split()[1]


def test_key_fingerprint_is_ssh_keygens(tmp_path):
    assert key_fingerprint(CA_KEY) == ca_fingerprint(tmp_path, CA_KEY)
    assert key_fingerprint(OTHER_KEY) == ca_fingerprint(tmp_path, OTHER_KEY)
    assert key_fingerprint("ssh-ed25519") is None and key_fingerprint("ssh-ed25519 !!!") is None


# ---- the policy file ----------------------------------------------------------------------------------------------

def test_a_ca_table_parses_with_its_defaults():
    policy = parse_policy(f'[cas.corp]\nkey = "{CA_KEY}"\nkeys = ["{OTHER_KEY}", "{CA_KEY}"]\n\n[users.alice]\n')
    assert policy.cas == {"corp": CertAuthority("corp", (CA_KEY, OTHER_KEY), principals_as_groups=False,
                                                require_known_user=True)}
    assert parse_policy("[users.alice]\n").cas == {}


def test_ca_round_trips_through_json_and_toml():
    policy = parse_policy(f'[cas.corp]\nkey = "{CA_KEY}"\nrequire_known_user = false\n\n[users.alice]\n')
    data = policy_to_dict(policy)
    assert data["cas"] == {"corp": {"keys": [CA_KEY], "principals_as_groups": False, "require_known_user": False}}
    assert policy_from_dict(data) == policy
    assert parse_policy(to_toml(data)) == policy
    assert "cas" not in policy_to_dict(parse_policy("[users.alice]\n"))  # older readers see what they knew


@pytest.mark.parametrize("text, line, message", [
    ('[users.a]\n\n[cas.corp]\nkey = "ssh-ed25519 AAAAnotbase64!"\n', 4,
     "cas.corp: key 1: ssh-ed25519 key is not valid base64; expected the line of the CA's .pub file"),
    ('[cas.corp]\nkey = "ssh-dss AAAAB3NzaC1kc3M="\n', 2, "cas.corp: key 1: key type 'ssh-dss' is not one of"),
    ('[cas.corp]\nkeys = ["{ca}", "ssh-ed25519"]\n', 2, "cas.corp: key 2: a key must look like 'TYPE BASE64"),
    ('[cas.corp]\nkey = "{ca}"\nprincipal = "x"\n', 3,
     "cas.corp has unknown key 'principal'; allowed keys are key, keys, principals_as_groups, require_known_user"),
    ('[users.a]\n[cas.corp]\n', 2, "cas.corp has no key; expected key = "),
    ('[cas.corp]\nkey = 5\n', 2, "cas.corp.key must be one OpenSSH public key line"),
    ('[cas.corp]\nkeys = "{ca}"\n', 2, "cas.corp.keys must be a list of OpenSSH public key lines"),
    ('[cas.corp]\nkey = "{ca}"\nrequire_known_user = "yes"\n', 3, "cas.corp.require_known_user must be true or false"),
    ('[cas.Corp]\nkey = "{ca}"\n', 1, "ca name 'Corp' is not valid"),
    ('cas = 1\n', 1, "cas must be a table of [cas.NAME] tables"),
])
def test_ca_errors_name_file_line_and_expectation(text, line, message):
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text.replace("{ca}", CA_KEY), "policy.toml")
    assert str(caught.value).startswith(f"policy.toml:{line}: "), str(caught.value)
    assert message in str(caught.value)


def test_store_keeps_the_declared_cas(tmp_path):
    store = Store(tmp_path / "bastion.db")
    try:
        both = parse_policy(f'[cas.corp]\nkey = "{CA_KEY}"\n\n[cas.vault]\nkey = "{OTHER_KEY}"\n'
                            'require_known_user = false\n')
        store.apply_policy(both)
        assert store.load_policy()[1].cas == both.cas
        one = parse_policy(f'[cas.vault]\nkey = "{CA_KEY}"\n')
        plan = store.plan_policy(one)
        diff = policy_diff(plan.current, plan.target, NOW)
        assert (diff.cas_added, diff.cas_removed, diff.cas_changed) == ((), ("corp",), ("vault",))
        assert diff.removes_access and not diff.empty
        store.apply_policy(one)
        assert store.load_policy()[1].cas == one.cas
    finally:
        store.close()


# ---- the checks ---------------------------------------------------------------------------------------------------

POLICY = Policy(users={"alice": UserPolicy("alice"), "old": UserPolicy("old", expires=NOW - timedelta(days=1))},
                cas={"corp": CertAuthority("corp", (CA_KEY,))})
GOOD = Certificate(key_id="alice@corp", serial=7, user_certificate=True, principals=("alice",),
                   valid_after=int((NOW - timedelta(minutes=5)).timestamp()),
                   valid_before=int((NOW + timedelta(hours=1)).timestamp()),
                   ca_fingerprint=key_fingerprint(CA_KEY) or "",
                   extensions=frozenset({"permit-port-forwarding", "permit-pty"}))


@pytest.mark.parametrize("change, user, address, reason", [
    ({}, "alice", HERE, None),
    ({"ca_fingerprint": key_fingerprint(OTHER_KEY)}, "alice", HERE, "certificate signed by an untrusted CA"),
    ({"user_certificate": False}, "alice", HERE, "a host certificate is not a user certificate"),
    ({"valid_before": int(NOW.timestamp())}, "alice", HERE, "certificate expired at 2026-12-02T08:00:00Z"),
    ({"valid_after": int(NOW.timestamp()) + 1}, "alice", HERE,
     "certificate not yet valid (valid from 2026-12-02T08:00:01Z)"),
    ({"valid_after": int(NOW.timestamp())}, "alice", HERE, None),  # valid_after is inclusive
    ({"valid_before": 2**64 - 1}, "alice", HERE, None),  # ssh-keygen's "forever"
    ({"principals": ()}, "alice", HERE, "certificate names no principals"),
    ({"principals": ("bob", "carol")}, "alice", HERE, "certificate is not valid for user alice (principals: bob, carol)"),
    ({"critical_options": ("force-command",)}, "alice", HERE, "certificate has force-command; a bastion runs no commands"),
    ({"critical_options": ("no-such-option@example.com",)}, "alice", HERE,
     "certificate has unsupported critical option no-such-option@example.com"),
    ({"critical_options": ("verify-required",)}, "alice", HERE, None),  # enforced at the signature (#21)
    ({"critical_options": ("source-address",), "source_addresses": (ip_network("127.0.0.9/32"),)}, "alice", HERE,
     "certificate not valid from 127.0.0.1 (source-address 127.0.0.9/32)"),
    ({"critical_options": ("source-address",), "source_addresses": (ip_network("127.0.0.0/24"),)}, "alice", HERE,
     None),
    ({"critical_options": ("source-address",), "source_addresses": (ip_network("fd00::/8"),
                                                                    ip_network("127.0.0.1/32"))},
     "alice", ip_address("::ffff:127.0.0.1"), None),  # an IPv4-mapped client is its IPv4 address
    ({"principals": ("mallory",)}, "mallory", HERE, "unknown user mallory (CA corp requires a known user)"),
    ({"principals": ("old",)}, "old", HERE, "access expired at 2026-12-01T08:00:00Z"),
])
def test_certificate_refusal(change, user, address, reason):
    assert certificate_refusal(POLICY, replace(GOOD, **change), user, address, NOW) == reason


def test_an_unknown_user_may_log_in_where_the_ca_does_not_require_known_users():
    policy = Policy(users={}, cas={"corp": CertAuthority("corp", (CA_KEY,), require_known_user=False)})
    assert certificate_refusal(policy, replace(GOOD, principals=("mallory",)), "mallory", HERE, NOW) is None


def test_trusted_authority_matches_any_key_of_a_ca():
    policy = Policy(cas={"corp": CertAuthority("corp", (OTHER_KEY, CA_KEY))})
    assert trusted_authority(policy, GOOD.ca_fingerprint).name == "corp"
    assert trusted_authority(Policy(), GOOD.ca_fingerprint) is None


def test_live_session_refusal():
    fingerprint = GOOD.ca_fingerprint
    assert certificate_session_refusal(POLICY, fingerprint, "alice", NOW) is None
    assert certificate_session_refusal(Policy(users=POLICY.users), fingerprint, "alice", NOW) == \
        "certificate authority no longer trusted"
    assert certificate_session_refusal(Policy(cas=POLICY.cas), fingerprint, "alice", NOW) == "user removed"
    assert certificate_session_refusal(POLICY, fingerprint, "old", NOW) == "access expired at 2026-12-01T08:00:00Z"


def test_port_forwarding_extension_narrows_the_session():
    assert certificate_key_options(GOOD).port_forwarding
    assert not certificate_key_options(replace(GOOD, extensions=frozenset({"permit-pty"}))).port_forwarding


def test_description_names_key_id_serial_and_ca():
    assert describe_certificate(GOOD) == f"key id alice@corp serial 7 CA {GOOD.ca_fingerprint}"


@given(key_id=st.text(max_size=300), principals=st.lists(st.text(max_size=80), max_size=5),
       user=st.text(max_size=40), serial=st.integers(0, 2**64 - 1),
       after=st.integers(0, 2**64 - 1), before=st.integers(0, 2**64 - 1),
       critical=st.lists(st.text(max_size=20), max_size=3))
def test_hostile_certificate_fields_give_a_short_printable_reason(key_id, principals, user, serial, after, before,
                                                                   critical):
    cert = replace(GOOD, key_id=key_id, principals=tuple(principals), serial=serial, valid_after=after,
                   valid_before=before, critical_options=tuple(critical))
    reason = certificate_refusal(POLICY, cert, user, HERE, NOW)
    for text in (reason or "", describe_certificate(cert)):
        assert text.isprintable()
        assert len(text) < 400



# ---- a certificate asyncssh will not decode, named by what it claims ------------------------------------------------

def make_certificate(tmp_path, key_type: str, *options: str) -> bytes:
    ca, key = tmp_path / f"ca-{key_type}", tmp_path / f"id-{key_type}"
    for path in (ca, key):
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", path], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", ca, "-I", "alice@corp", "-z", "42", "-n", "alice,ops",
                    "-V", "20260101000000:20270101000000", *options, f"{key}.pub"], check=True, capture_output=True)
    return base64.b64decode((tmp_path / f"id-{key_type}-cert.pub").read_text().split()[1])


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_read_certificate_blob_reads_ssh_keygens_certificates(tmp_path, key_type):
    blob = make_certificate(tmp_path, key_type, "-O", "source-address=10.0.0.0/8", "-O", "no-pty")
    cert = read_certificate_blob(blob)
    ca_line = (tmp_path / f"ca-{key_type}.pub").read_text()
    assert cert is not None
    assert (cert.key_id, cert.serial, cert.user_certificate, cert.principals) == ("alice@corp", 42, True,
                                                                                  ("alice", "ops"))
    assert (cert.valid_after, cert.valid_before) == (
        int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()), int(datetime(2027, 1, 1, tzinfo=UTC).timestamp()))
    assert cert.ca_fingerprint == key_fingerprint(ca_line) and cert.critical_options == ("source-address",)
    assert "permit-port-forwarding" in cert.extensions and "permit-pty" not in cert.extensions


def test_an_unknown_critical_option_is_named_in_the_refusal(tmp_path):
    blob = make_certificate(tmp_path, "ed25519", "-O", "critical:bastion-test@example.com")
    fingerprint = key_fingerprint((tmp_path / "ca-ed25519.pub").read_text())
    assert unreadable_refusal(blob, "Invalid OpenSSH certificate") == (
        "certificate refused: certificate has unsupported critical option bastion-test@example.com: key id alice@corp "
        f"serial 42 CA {fingerprint} (as it claims, not verified)")
    assert unreadable_refusal(blob[:40], "Invalid OpenSSH certificate") == \
        "certificate refused: unreadable certificate (Invalid OpenSSH certificate)"


@given(blob=st.binary(max_size=600), problem=st.text(max_size=500))
def test_hostile_certificate_blobs_never_raise(blob, problem):
    read_certificate_blob(blob)
    prefixed = b"\x00\x00\x00\x20ssh-ed25519-cert-v01@openssh.com" + blob
    read_certificate_blob(prefixed)
    for candidate in (blob, prefixed):
        reason = unreadable_refusal(candidate, problem)
        assert reason.startswith("certificate refused: ") and reason.isprintable() and len(reason) < 400
