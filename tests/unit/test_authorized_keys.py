"""authorized_keys options (policy/authorized_keys.py): parsing as sshd does, refusing what cannot be honoured,
and the from= / permitopen= / permitlisten= / expiry-time= decisions."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from bastion.policy.authorized_keys import (
    KeyOptions,
    key_listen_refusal,
    key_login_refusal,
    key_open_refusal,
    parse_options,
    source_allowed,
    split_line,
)
from bastion.policy.model import PolicyError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA76YY4fGtgVeCCOOwSjZPMIbK+QeFj+IESL9g6j8d1K alice@laptop"
NOW = datetime(2026, 12, 2, tzinfo=timezone.utc)


def ip(text: str):
    return ipaddress.ip_address(text)


def test_a_line_without_options_is_all_key():
    assert split_line(KEY) == ("", KEY)


def test_options_with_quoted_spaces_commas_and_escaped_quotes():
    line = f'from="10.0.0.0/8,!10.0.0.5",permitopen="db:5432",command="echo \\"a b\\"" {KEY}'
    options, key = split_line(line)
    assert key == KEY and options.startswith('from="10.0.0.0/8,!10.0.0.5"')


def test_kept_options_and_always_in_force_ones():
    options = parse_options('FROM="10.0.0.0/8",no-pty,no-X11-forwarding,no-agent-forwarding,no-user-rc,'
                            'permitopen="db.internal:5432",permitopen="[fd00::1]:*",permitlisten="8080",'
                            'expiry-time="203001021530"')
    assert options.sources == ("10.0.0.0/8",)
    assert options.permit_open == ("db.internal:5432", "[fd00::1]:*")
    assert options.permit_listen == ("8080",)
    assert options.expires == datetime(2030, 1, 2, 15, 30, tzinfo=timezone.utc)
    assert options.port_forwarding


def test_expiry_time_without_z_is_local_time_as_sshd_reads_it():
    zone = timezone(timedelta(hours=2))
    assert parse_options('expiry-time="20300102"', zone).expires == datetime(2030, 1, 1, 22, tzinfo=timezone.utc)
    assert parse_options('expiry-time="20300102Z"', zone).expires == datetime(2030, 1, 2, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, forwarding", [
    ("restrict", False), ("no-port-forwarding", False), ("restrict,port-forwarding", True),
    ("restrict,port-forwarding,no-port-forwarding", False), ("port-forwarding", True),
])
def test_restrict_and_port_forwarding(text, forwarding):
    assert parse_options(text).port_forwarding is forwarding


@pytest.mark.parametrize("text, named", [
    ('command="/bin/date"', "option command is refused: a bastion runs no commands"),
    ('environment="A=b"', "option environment is refused"),
    ("cert-authority", "option cert-authority is refused"),
    ("agent-forwarding", "option agent-forwarding is refused"),
    ("no-such-thing", "option no-such-thing is refused: not an option this bastion knows"),
    ('from="host.example.com"', "host names"),
    ('from="10.0.0.1/8"', "not a network"),
    ('expiry-time="tomorrow"', "expected YYYYMMDD"),
    ('expiry-time="20301340"', "not a valid date"),
    ('permitopen="db"', "expected HOST:PORT"),
    ('permitopen="db:0"', "1..65535"),
    ("from=10.0.0.1", "double quotes"),
    ('from="10.0.0.1', "unbalanced quote"),
    ("no-pty,", "may not end with ','"),
    ('restrict="yes"', "takes no value"),
    ("from", "needs a value"),
])
def test_refused_options_are_named(text, named):
    with pytest.raises(PolicyError, match=named.replace("(", r"\(")):
        parse_options(text)


@given(st.text(max_size=80))
def test_hostile_option_text_is_a_policy_error_or_options(text):
    try:
        options = parse_options(text)
    except PolicyError:
        return
    assert isinstance(options, KeyOptions)
    assert KeyOptions.from_json(options.to_json()) == options


@given(st.text(max_size=120))
def test_hostile_lines_split_or_fail_cleanly(line):
    try:
        options, key = split_line(line)
    except PolicyError:
        return
    assert key and key in line


def test_from_patterns_as_sshd_matches_them_without_dns():
    assert source_allowed("10.0.0.0/8,!10.0.0.5", ip("10.1.2.3"))
    assert not source_allowed("10.0.0.0/8,!10.0.0.5", ip("10.0.0.5"))
    assert not source_allowed("10.0.0.0/8", ip("192.168.1.1"))
    assert source_allowed("192.168.1.*", ip("192.168.1.77"))
    assert not source_allowed("192.168.1.?", ip("192.168.1.77"))
    assert source_allowed("10.0.0.0/8", ip("::ffff:10.1.1.1"))  # an IPv4 client seen on a dual-stack socket
    assert not source_allowed("fd00::/8", ip("10.1.1.1"))


def test_login_refusals_name_the_option():
    options = KeyOptions(sources=("10.0.0.0/8",), expires=NOW)
    assert key_login_refusal(options, ip("10.0.0.1"), NOW - timedelta(seconds=1)) is None
    assert key_login_refusal(options, ip("10.0.0.1"), NOW) == "key expired at 2026-12-02T00:00:00Z (expiry-time)"
    assert key_login_refusal(options, ip("11.0.0.1"), NOW) == 'key not allowed from 11.0.0.1 (from="10.0.0.0/8")'


def test_permitopen_compares_the_name_as_typed():
    options = KeyOptions(permit_open=("db.internal:5432", "[fd00::1]:*"))
    assert key_open_refusal(options, "db.internal", 5432) is None
    assert key_open_refusal(options, "DB.internal", 5432) is None
    assert key_open_refusal(options, "fd00::1", 22) is None
    assert "may only open" in key_open_refusal(options, "db.internal", 5433)
    assert "may only open" in key_open_refusal(options, "10.1.1.1", 5432)  # no lookups: the address is not the name
    assert key_open_refusal(KeyOptions(), "anything", 1) is None
    assert "may not open tunnels" in key_open_refusal(KeyOptions(port_forwarding=False), "db.internal", 5432)


def test_permitlisten_host_is_optional_and_may_hold_wildcards():
    assert key_listen_refusal(KeyOptions(permit_listen=("8080",)), "", 8080) is None
    assert key_listen_refusal(KeyOptions(permit_listen=("localhost:*",)), "localhost", 9999) is None
    assert key_listen_refusal(KeyOptions(permit_listen=("127.0.0.*:8080",)), "127.0.0.1", 8080) is None
    assert "may only listen" in key_listen_refusal(KeyOptions(permit_listen=("localhost:8080",)), "0.0.0.0", 8080)
    assert "may not forward" in key_listen_refusal(KeyOptions(port_forwarding=False), "", 8080)
