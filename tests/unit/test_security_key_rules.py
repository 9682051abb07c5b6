"""Security keys in the policy (#21): require_security_key / require_user_verification in policy files (FILE:LINE
errors, JSON and TOML round trips), the authorized_keys options no-touch-required / verify-required, and the pure
rules of policy/security_keys.py, table-driven, with hostile key types and flags under hypothesis."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.policy.authorized_keys import KeyOptions, parse_options
from bastion.policy.certificates import Certificate, certificate_key_options
from bastion.policy.file import PolicyFileError, parse_policy, policy_from_dict, policy_to_dict, to_toml
from bastion.policy.security_keys import (
    PRESENCE_MISSING,
    VERIFICATION_MISSING,
    SecurityKeyRules,
    SignatureRequirements,
    describe_signature,
    is_security_key,
    key_type_refusal,
    security_key_rules,
    signature_refusal,
    signature_requirements,
)

ED25519_SK = "sk-ssh-ed25519@openssh.com"
ECDSA_SK = "sk-ecdsa-sha2-nistp256@openssh.com"

FILE = """\
[groups.pin]
require_user_verification = true

[groups.hw]
require_security_key = true

[users.alice]
groups = ["pin"]

[users.erin]
groups = ["hw", "missing"]

[users.frank]
require_security_key = true
require_user_verification = true

[users.bob]
"""


def test_rules_come_from_the_user_or_any_of_its_groups():
    policy = parse_policy(FILE)
    assert security_key_rules(policy, "alice") == SecurityKeyRules(security_key=False, user_verification=True)
    assert security_key_rules(policy, "erin") == SecurityKeyRules(security_key=True, user_verification=False)
    assert security_key_rules(policy, "frank") == SecurityKeyRules(True, True)
    assert security_key_rules(policy, "bob") == SecurityKeyRules()
    assert security_key_rules(policy, "nobody") == SecurityKeyRules()


def test_the_settings_round_trip_through_json_and_toml_and_are_absent_when_off():
    policy = parse_policy(FILE)
    data = policy_to_dict(policy)
    assert data["groups"]["pin"]["require_user_verification"] is True
    assert data["users"]["frank"]["require_security_key"] is True
    assert "require_security_key" not in data["users"]["bob"] and "require_user_verification" not in data["groups"]["hw"]
    assert policy_from_dict(data) == policy
    assert parse_policy(to_toml(data)) == policy


@pytest.mark.parametrize("text, message", [
    ('[users.alice]\nrequire_security_key = "yes"\n', "p.toml:2: users.alice.require_security_key must be true or false"),
    ("[groups.ops]\n\nrequire_user_verification = 1\n",
     "p.toml:3: groups.ops.require_user_verification must be true or false"),
    ("[groups.ops]\nrequire_security_keys = true\n", "p.toml:2: groups.ops has unknown key 'require_security_keys'; "
     "allowed keys are allow, deny, listen, require_totp, require_security_key, require_user_verification"),
])
def test_a_bad_setting_names_file_and_line(text, message):
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text, "p.toml")
    assert str(caught.value) == message


def test_a_stored_policy_with_a_bad_setting_is_refused():
    with pytest.raises(PolicyFileError, match="groups.ops.require_security_key must be true or false"):
        policy_from_dict({"groups": {"ops": {"require_security_key": "true"}}})


@pytest.mark.parametrize("key_type, expected", [
    (ED25519_SK, True), (ECDSA_SK, True), ("sk-ssh-ed25519-cert-v01@openssh.com", True),
    ("sk-ecdsa-sha2-nistp256-cert-v01@openssh.com", True), ("ssh-ed25519", False), ("ecdsa-sha2-nistp256", False),
    ("ssh-rsa", False), ("ssh-ed25519-cert-v01@openssh.com", False), ("", False), ("sk-ssh-ed448@openssh.com", False),
])
def test_security_key_types(key_type, expected):
    assert is_security_key(key_type) is expected


@pytest.mark.parametrize("rules, key_type, expected", [
    (SecurityKeyRules(), "ssh-ed25519", None),
    (SecurityKeyRules(security_key=True), ED25519_SK, None),
    (SecurityKeyRules(security_key=True), ECDSA_SK, None),
    (SecurityKeyRules(security_key=True), "ssh-ed25519", "a security key is required (require_security_key); "
     "ssh-ed25519 keys are refused, use one made by ssh-keygen -t ed25519-sk"),
    (SecurityKeyRules(user_verification=True), "rsa-sha2-512", "a security key is required "
     "(require_user_verification); rsa-sha2-512 keys are refused, use one made by ssh-keygen -t ed25519-sk"),
    (SecurityKeyRules(True, True), "ecdsa-sha2-nistp256", "a security key is required (require_security_key); "
     "ecdsa-sha2-nistp256 keys are refused, use one made by ssh-keygen -t ed25519-sk"),
    (SecurityKeyRules(user_verification=True), ED25519_SK, None),
])
def test_key_type_refusal(rules, key_type, expected):
    assert key_type_refusal(rules, key_type) == expected


@pytest.mark.parametrize("flags, requirements, expected", [
    (0x01, SignatureRequirements(), None),
    (0x05, SignatureRequirements(), None),
    (0x00, SignatureRequirements(), PRESENCE_MISSING),
    (0x04, SignatureRequirements(), PRESENCE_MISSING),  # verified but not touched: presence is still wanted
    (0x00, SignatureRequirements(user_presence=False), None),
    (0x01, SignatureRequirements(user_verification=True), VERIFICATION_MISSING),
    (0x05, SignatureRequirements(user_verification=True), None),
    (0x04, SignatureRequirements(user_presence=False, user_verification=True), None),
    (0x00, SignatureRequirements(user_presence=False, user_verification=True), VERIFICATION_MISSING),
    (0xFA, SignatureRequirements(user_verification=True), PRESENCE_MISSING),  # other bits mean nothing
])
def test_signature_refusal(flags, requirements, expected):
    assert signature_refusal(flags, requirements) == expected


@pytest.mark.parametrize("rules, options, expected", [
    (SecurityKeyRules(), KeyOptions(), SignatureRequirements(True, False)),
    (SecurityKeyRules(), parse_options("no-touch-required"), SignatureRequirements(False, False)),
    (SecurityKeyRules(), parse_options("verify-required"), SignatureRequirements(True, True)),
    (SecurityKeyRules(user_verification=True), parse_options("no-touch-required"), SignatureRequirements(False, True)),
    (SecurityKeyRules(security_key=True), KeyOptions(), SignatureRequirements(True, False)),
])
def test_signature_requirements_from_the_key_options_and_the_policy(rules, options, expected):
    assert signature_requirements(rules, options) == expected


def test_a_certificate_waives_touch_or_requires_verification_as_in_sshd():
    cert = Certificate(key_id="k", serial=1, user_certificate=True, principals=("alice",), valid_after=0,
                       valid_before=2**63, ca_fingerprint="SHA256:x")
    assert certificate_key_options(cert).touch_required is True
    waived = dataclasses.replace(cert, extensions=frozenset({"no-touch-required", "permit-port-forwarding"}))
    assert certificate_key_options(waived).touch_required is False
    verified = dataclasses.replace(cert, critical_options=("verify-required",))
    assert certificate_key_options(verified).verify_required is True
    assert certificate_key_options(cert).verify_required is False


@pytest.mark.parametrize("text, touch, verify, described", [
    ("no-touch-required", False, False, "no-touch-required"),
    ("verify-required", True, True, "verify-required"),
    ('No-Touch-Required,verify-required,from="10.0.0.0/8"', False, True,
     'from="10.0.0.0/8",no-touch-required,verify-required'),
    ("restrict", True, False, "no-port-forwarding"),
])
def test_authorized_keys_security_key_options(text, touch, verify, described):
    options = parse_options(text)
    assert (options.touch_required, options.verify_required) == (touch, verify)
    assert options.describe() == described
    assert KeyOptions.from_json(options.to_json()) == options
    assert parse_options(described) == options


def test_a_stored_key_without_the_new_fields_keeps_its_meaning():
    assert KeyOptions.from_json({}) == KeyOptions() and KeyOptions().to_json() == {}
    assert KeyOptions(touch_required=False).to_json() == {"no_touch_required": True}


def test_describe_signature():
    assert describe_signature(0x01, 7) == "security key: user presence, counter 7"
    assert describe_signature(0x05, 0) == "security key: user presence, user verification, counter 0"
    assert describe_signature(0x04, 2**32 - 1) == "security key: user verification, counter 4294967295"
    assert describe_signature(0x00, 3) == "security key: neither user presence nor user verification, counter 3"


@given(st.text(max_size=300), st.booleans(), st.booleans())
def test_hostile_key_types_give_one_short_printable_line(key_type, security_key, verification):
    reason = key_type_refusal(SecurityKeyRules(security_key, verification), key_type)
    if reason is not None:
        assert reason.isprintable() and len(reason) < 250


@given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_any_flags_and_counter(flags, counter, presence, verification):
    refusal = signature_refusal(flags, SignatureRequirements(presence, verification))
    assert refusal in (None, PRESENCE_MISSING, VERIFICATION_MISSING)
    assert (refusal is None) == ((not presence or bool(flags & 1)) and (not verification or bool(flags & 4)))
    assert describe_signature(flags, counter).isprintable()
