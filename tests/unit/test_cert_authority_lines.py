"""`cert-authority` lines of authorized_keys files (#21): recognised, and turned into the [cas.NAME] lines of a policy
file that parse back to the same CA, with comments where OpenSSH's meaning differs (principals=, from=)."""

from __future__ import annotations

import tomllib

from hypothesis import given, strategies as st

from bastion.policy.authorized_keys import cert_authority_key, cert_authority_toml
from bastion.policy.file import parse_policy

CA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICFtjMtQBVvxaVO/u0cT5WUGES839vSXnWwcF8VYcOJS ca@corp"


def test_lines_without_cert_authority_are_not_cas():
    assert cert_authority_key(CA) is None
    assert cert_authority_key(f'from="10.0.0.0/8" {CA}') is None
    assert cert_authority_key('cert-authority,"unbalanced ' + CA) is None  # unreadable: parse_options says why


def test_cert_authority_with_principals_and_other_options():
    assert cert_authority_key(f"cert-authority {CA}") == (CA, None, ())
    assert cert_authority_key(f'CERT-AUTHORITY,principals="alice,ops",from="10.0.0.0/8"  {CA}') == \
        (CA, ("alice", "ops"), ("from",))


def test_toml_parses_back_to_the_same_ca_and_says_what_differs():
    text = cert_authority_toml("corp", CA, {"alice": (("alice", "ops"), ()), "bob": (None, ("from",)),
                                            "carol": (("carol",), ())})
    policy = parse_policy(text, "ca.toml")
    authority = policy.cas["corp"]
    assert authority.keys == (CA,) and authority.require_known_user and not authority.principals_as_groups
    assert 'alice: principals="alice,ops" has no equivalent here' in text
    assert "bob: options from of the line have no equivalent here" in text
    assert "carol:" not in text  # principals="carol" on carol's own line means what the policy means


@given(comment=st.text(max_size=40), user=st.text(min_size=1, max_size=20))
def test_hostile_comments_and_names_still_make_valid_toml(comment, user):
    key = CA.rsplit(" ", 1)[0] + " " + comment
    text = cert_authority_toml("corp", key, {user: ((user + "x",), ("from",))})
    data = tomllib.loads(text)  # never a TOML error, whatever the file held
    assert data["cas"]["corp"]["key"].startswith(CA.rsplit(" ", 1)[0])
    assert all(line.startswith(("#", "[", "key =", "require_known_user")) for line in text.splitlines())
