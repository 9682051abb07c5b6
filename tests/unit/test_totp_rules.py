"""The second factor's pure rules (policy/totp.py) and its policy file keys (#21): who needs a code, which codes
pass (RFC 6238, ±1 step, used once), the otpauth:// URI, and `require_totp` in files, JSON and TOML."""

from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policy.file import PolicyFileError, parse_policy, policy_from_dict, policy_to_dict, to_toml
from bastion.policy.model import GroupPolicy, Policy, UserPolicy
from bastion.policy.totp import USED, WRONG, check_code, provisioning_uri, totp_required, valid_secret

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_800_000_015.0  # 15 s into step 60,000,000
STEP = 60_000_000


def code(step: int) -> str:
    return pyotp.TOTP(SECRET).at(step * 30)


# ---- who needs a code ------------------------------------------------------------------------------------

POLICY = Policy(
    users={"alice": UserPolicy("alice", require_totp=True), "bob": UserPolicy("bob", groups=("ops",)),
           "carol": UserPolicy("carol", groups=("dev", "gone")), "dave": UserPolicy("dave")},
    groups={"ops": GroupPolicy("ops", require_totp=True), "dev": GroupPolicy("dev")},
)


@pytest.mark.parametrize("user, needed", [
    ("alice", True),    # on the user
    ("bob", True),      # through a group
    ("carol", False),   # groups without it, and one missing from the policy
    ("dave", False),    # nothing said
    ("mallory", False),  # not in the policy
])
def test_totp_required(user, needed):
    assert totp_required(POLICY, user) is needed


# ---- which codes pass ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset, accepted", [(-2, False), (-1, True), (0, True), (1, True), (2, False)])
def test_a_code_is_accepted_in_its_step_and_one_either_side(offset, accepted):
    result = check_code(SECRET, code(STEP + offset), NOW, None)
    assert result.accepted is accepted
    assert result.step == (STEP + offset if accepted else None)
    assert result.refusal == (None if accepted else WRONG)


def test_a_code_is_used_once_and_older_codes_stay_used():
    assert check_code(SECRET, code(STEP), NOW, STEP - 1).step == STEP
    assert check_code(SECRET, code(STEP), NOW, STEP).refusal == USED  # the replay
    assert check_code(SECRET, code(STEP - 1), NOW, STEP).refusal == USED  # an older code after a newer one
    assert check_code(SECRET, code(STEP + 1), NOW, STEP).step == STEP + 1  # the next one is new


@pytest.mark.parametrize("typed", ["", "12345", "1234567", "abcdef", "１２３４５６", "12345\n6", "-"])
def test_malformed_codes_are_wrong(typed):
    assert check_code(SECRET, typed, NOW, None).refusal == WRONG


def test_spaces_and_dashes_inside_a_code_are_ignored():
    right = code(STEP)
    assert check_code(SECRET, f" {right[:3]} {right[3:]} ", NOW, None).accepted
    assert check_code(SECRET, f"{right[:3]}-{right[3:]}", NOW, None).accepted


@settings(max_examples=300)
@given(typed=st.text(max_size=40), last=st.one_of(st.none(), st.integers(min_value=-1, max_value=2**40)))
def test_hostile_input_never_raises_and_only_the_three_codes_pass(typed, last):
    result = check_code(SECRET, typed, NOW, last)
    window = {code(STEP - 1), code(STEP), code(STEP + 1)}
    cleaned = typed.replace(" ", "").replace("-", "").strip()
    assert result.accepted is False or cleaned in window
    assert result.accepted or result.refusal in (WRONG, USED)


def test_the_uri_is_what_authenticator_apps_read():
    uri = provisioning_uri(SECRET, "alice", "bastion.example.com:2222")
    parsed = pyotp.parse_uri(uri)
    assert parsed.secret == SECRET and parsed.name == "alice" and parsed.issuer == "bastion bastion.example.com:2222"
    assert parsed.digits == 6 and parsed.interval == 30
    query = parse_qs(urlparse(uri).query)
    assert query["algorithm"] == ["SHA1"]
    assert urlparse(provisioning_uri(SECRET, "bob")).path == "/bastion:bob"


def test_secrets_as_enrol_makes_them():
    assert valid_secret(pyotp.random_base32())
    assert not valid_secret("SHORT") and not valid_secret("jbswy3dpehpk3pxpjbswy3dpehpk3pxp")


# ---- require_totp in policy files ------------------------------------------------------------------------

FILE = """\
[groups.ops]
allow = ["10.0.0.0/8:22"]
require_totp = true

[users.alice]
groups = ["ops"]

[users.bob]
require_totp = true
"""


def test_require_totp_in_a_file_per_user_and_group():
    policy = parse_policy(FILE)
    assert policy.groups["ops"].require_totp and policy.users["bob"].require_totp
    assert not policy.users["alice"].require_totp
    assert totp_required(policy, "alice") and totp_required(policy, "bob")


def test_require_totp_round_trips_through_json_and_toml():
    policy = parse_policy(FILE)
    data = policy_to_dict(policy)
    assert data["users"]["bob"]["require_totp"] is True and data["groups"]["ops"]["require_totp"] is True
    assert "require_totp" not in data["users"]["alice"]  # absent when false: stored rows of older versions agree
    assert policy_from_dict(data) == policy
    assert parse_policy(to_toml(data)) == policy


@pytest.mark.parametrize("text, message", [
    ('[users.alice]\nrequire_totp = "yes"\n', "p.toml:2: users.alice.require_totp must be true or false"),
    ("[groups.ops]\n\nrequire_totp = 1\n", "p.toml:3: groups.ops.require_totp must be true or false"),
    ("[users.alice]\nrequire_tot = true\n", "p.toml:2: users.alice has unknown key 'require_tot'; allowed keys are "
                                            "keys, groups, allow, deny, listen, expires, require_totp, "
                                            "require_security_key, require_user_verification"),
])
def test_a_bad_require_totp_names_file_and_line(text, message):
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text, "p.toml")
    assert str(caught.value) == message


def test_a_stored_policy_with_a_bad_flag_is_refused():
    with pytest.raises(PolicyFileError, match="users.alice.require_totp must be true or false"):
        policy_from_dict({"users": {"alice": {"require_totp": "true"}}})


# ---- the gateway's half: which methods are offered when, and the fail-closed check -----------------------

class _Events:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _login(user: str):
    from bastion.gateway.totp import SecondFactor

    login = SecondFactor()
    login.user, login.key_fingerprint, login._totp_needed = user, "SHA256:x", totp_required(POLICY, user)
    login._totp_secret = (SECRET, None)
    login.log = login.auth_log = _Events()
    login.ctx = SimpleNamespace(config=SimpleNamespace(login_grace_seconds=0))  # no login timer to restart
    return login


def test_a_user_who_needs_a_code_is_offered_keys_then_only_keyboard_interactive():
    login = _login("alice")
    assert login.public_key_auth_supported() and not login.kbdint_auth_supported()
    assert login.more_auth_required("alice", "publickey") is True  # partial success
    assert not login.public_key_auth_supported() and login.kbdint_auth_supported()
    assert login.auth_method == "publickey+totp"
    assert login.second_factor_refusal(POLICY) == "a verification code is required"  # no code given yet
    login.totp_verified = True
    assert login.more_auth_required("alice", "keyboard-interactive") is False and not login.kbdint_auth_supported()
    assert login.second_factor_refusal(POLICY) is None


def test_a_user_without_totp_logs_in_with_the_key_alone():
    login = _login("dave")
    assert login.more_auth_required("dave", "publickey") is False
    assert login.public_key_auth_supported() and not login.kbdint_auth_supported()
    assert login.auth_method == "publickey" and login.second_factor_refusal(POLICY) is None


def test_a_session_without_the_code_is_refused_when_the_policy_wants_one_now():
    """Fail closed: without transport/partial_auth.py's hook asyncssh logs a key straight in; _begin_session then
    finds the code missing. Also when require_totp was switched on while the client was logging in."""
    login = _login("dave")
    stricter = Policy(users={"dave": UserPolicy("dave", require_totp=True)})
    assert login.second_factor_refusal(stricter) == "a verification code is required"
