"""The home's user CA (#21): what `bastion ca sign` may put in a certificate (policy/signing.py), the home CA trusted
as CA `home` by the policy in force (PolicyCache, HomeAuthority) and shown to ssh-config."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from ipaddress import ip_network

import pytest
from hypothesis import given, strategies as st

from bastion.config import Config
from bastion.gateway.context import PolicyCache
from bastion.ops.ssh_config import ClientSetup, render_ssh_config
from bastion.policy.file import parse_policy
from bastion.policy.model import CertAuthority, Policy, PolicyError, UserPolicy
from bastion.policy.signing import home_authority, parse_validity, signing_request, with_home_authority
from bastion.service.home import HomeAuthority, create_user_ca, initialize
from bastion.store.sqlite import Store

NOW = datetime(2026, 12, 2, 8, 0, 0, 123456, tzinfo=timezone.utc)
CA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICFtjMtQBVvxaVO/u0cT5WUGES839vSXnWwcF8VYcOJS"


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("8h", 28800), ("2d", 172800),
                                           ("1w", 604800), (" 24h ", 86400)])
def test_validity_lengths(text, seconds):
    assert parse_validity(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "8", "h", "0h", "-1h", "8 h", "1.5h", "8H", "1y", "53w", "99999999s", "8hx"])
def test_validity_that_is_not_a_length_is_refused(text):
    with pytest.raises(PolicyError):
        parse_validity(text)


@given(st.text(max_size=30))
def test_validity_parser_never_raises_anything_else(text):
    try:
        assert parse_validity(text) <= timedelta(days=366)
    except PolicyError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 200


def test_signing_request_defaults_and_limits():
    request = signing_request("alice", 7, "8h", "24h", NOW)
    assert request.principals == ("alice",) and request.key_id == "alice@bastion"
    assert request.valid_after == datetime(2026, 12, 2, 7, 55, tzinfo=timezone.utc)  # 5 minutes of clock skew
    assert request.valid_before == datetime(2026, 12, 2, 16, 0, tzinfo=timezone.utc)
    assert request.extensions == ("permit-port-forwarding",)
    assert signing_request("alice", 1, "24h", "24h", NOW).valid_before - NOW.replace(microsecond=0) == \
        timedelta(hours=24)  # exactly the maximum is allowed
    many = signing_request("alice", 1, "1h", "24h", NOW, ("alice", "ops", "alice"), ("10.0.0.0/8,::ffff:10.1.0.0/112",
                                                                                       "192.0.2.7"))
    assert many.principals == ("alice", "ops")
    assert many.source_addresses == (ip_network("10.0.0.0/8"), ip_network("10.1.0.0/16"), ip_network("192.0.2.7/32"))


@pytest.mark.parametrize("args, words", [
    (("alice", 1, "25h", "24h"), "longer than ca_max_validity (24h"),
    (("Alice", 1, "1h", "24h"), "user name 'Alice' is not valid"),
    (("alice", 0, "1h", "24h"), "serial 0 is outside"),
    (("alice", 2 ** 64, "1h", "24h"), "is outside 1..2^64-1"),
])
def test_signing_request_refusals(args, words):
    with pytest.raises(PolicyError, match=words.replace("(", r"\(").replace("^", r"\^")):
        signing_request(*args, NOW)


def test_bad_source_address_and_principal_are_named():
    with pytest.raises(PolicyError, match="'10.0.0.1/8' is not an address or CIDR"):
        signing_request("alice", 1, "1h", "24h", NOW, source_addresses=("10.0.0.1/8",))  # host bits set
    with pytest.raises(PolicyError, match="principal 'a b'"):
        signing_request("alice", 1, "1h", "24h", NOW, principals=("a b",))


def test_the_home_ca_is_trusted_as_home_unless_the_policy_declares_home_itself():
    authority = home_authority(CA + " bastion user CA (/var/lib/bastion)")
    assert authority == CertAuthority("home", (CA,), principals_as_groups=False, require_known_user=True)
    policy = Policy({"alice": UserPolicy("alice")})
    assert with_home_authority(policy, None) is policy
    assert with_home_authority(policy, authority).cas == {"home": authority}
    declared = parse_policy(f'[cas.home]\nkey = "{CA}"\nrequire_known_user = false\n')
    assert with_home_authority(declared, authority).cas["home"].require_known_user is False


def test_the_server_trusts_a_home_ca_made_while_it_runs(tmp_path):
    config = Config(home=tmp_path / "home")
    initialize(config)
    store = Store(config.database)
    changes = []
    cache = PolicyCache(store, on_change=changes.append, home_authority=HomeAuthority(config))

    async def scenario() -> None:
        assert "home" not in (await cache.current()).cas
        line = create_user_ca(config)
        policy = await cache.current()  # no new policy version: the new CA file alone is the change
        assert policy.cas["home"].keys == (" ".join(line.split()[:2]),)
        assert changes[-1] is policy
        assert await cache.current() is policy  # and then nothing more changes

    try:
        asyncio.run(scenario())
    finally:
        store.close()
    assert (config.home / "user_ca_key").stat().st_mode & 0o777 == 0o600


def test_ssh_config_names_the_certificate_and_its_key_and_hints_where_a_ca_is_trusted():
    policy = Policy({"alice": UserPolicy("alice")}, cas={"home": home_authority(CA)})
    setup = ClientSetup(user="alice", host="bastion.example", certificate_file="~/.ssh/id_ed25519-cert.pub")
    text = render_ssh_config(setup, policy, [CA], NOW)
    assert "    IdentityFile ~/.ssh/id_ed25519\n    IdentitiesOnly yes\n    CertificateFile ~/.ssh/id_ed25519-cert.pub" \
        in text
    hinted = render_ssh_config(ClientSetup(user="alice", host="bastion.example"), policy, [CA], NOW)
    assert "#   CertificateFile ~/.ssh/id_ed25519-cert.pub" in hinted and "IdentityFile" not in hinted
    plain = render_ssh_config(ClientSetup(user="alice", host="bastion.example"), Policy({"alice": UserPolicy("alice")}),
                              [CA], NOW)
    assert "CertificateFile" not in plain


def test_doctor_counts_users_without_keys_as_certificate_users_where_a_ca_is_trusted():
    from bastion.ops.doctor import WARNING, home_ca_findings, policy_findings

    users = [{"name": "alice", "keys": []}]
    plain = Policy({"alice": UserPolicy("alice", allow=parse_policy('[users.a]\nallow = ["10.1.2.3"]\n')
                                        .users["a"].allow)})
    assert [f.level for f in policy_findings(plain, users)] == [WARNING]  # no key and no CA: cannot log in
    trusted = with_home_authority(plain, home_authority(CA))
    [finding] = policy_findings(trusted, users)
    assert finding.message == "1 users, 1 of them with no key, by certificate only; the policy grants access"
    other = parse_policy('[cas.home]\nkey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"\n')
    [clash] = home_ca_findings(other, home_authority(CA), 0o100600)
    assert clash.level == WARNING and "does not hold the home CA key" in clash.message
    assert [f.level for f in home_ca_findings(Policy(), home_authority(CA), 0o100644)] == ["ok", "problem"]
