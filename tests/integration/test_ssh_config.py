"""`bastion ssh-config`: grants become OpenSSH patterns that match exactly the granted addresses, and the real
OpenSSH client (`ssh -G`, which prints the configuration it would use and connects nowhere) routes granted
targets through the bastion and nothing else. The end-to-end use is in e2e/test_e2e_ssh_config.py."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bastion.cli.main import app
from bastion.config import Config
from bastion.policy.file import parse_policy
from bastion.service.home import initialize
from bastion.ops.ssh_config import (
    ClientSetup,
    ipv4_patterns,
    ipv6_patterns,
    known_hosts_lines,
    octet_patterns,
    render_ssh_config,
    split_public_name,
)
from bastion.store.sqlite import Store, parse_public_keys

NOW = datetime(2026, 6, 1, tzinfo=UTC)
SSH = shutil.which("ssh")


def openssh_matches(patterns: list[str], text: str) -> bool:
    """OpenSSH's match_pattern(): '*' is any run of characters (dots too), '?' exactly one, nothing else special."""
    return _pattern_regex(tuple(patterns)).fullmatch(text) is not None


@functools.lru_cache(maxsize=None)
def _pattern_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in p)
                               for p in patterns))


# ---- patterns ------------------------------------------------------------------------------------------


def test_octet_patterns_match_exactly_their_range_for_every_cidr_block():
    for bits in range(0, 9):
        size = 2**bits
        for low in range(0, 256, size):
            patterns = octet_patterns(low, low + size - 1)
            matched = {n for n in range(256) if openssh_matches(patterns, str(n))}
            assert matched == set(range(low, low + size)), (low, size, patterns)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255))
def test_octet_patterns_match_exactly_any_range(a, b):
    low, high = min(a, b), max(a, b)
    patterns = octet_patterns(low, high)
    assert {n for n in range(256) if openssh_matches(patterns, str(n))} == set(range(low, high + 1))


@pytest.mark.parametrize("network, expected", [
    ("10.0.0.0/8", ["10.*"]),
    ("10.20.0.0/16", ["10.20.*"]),
    ("10.1.2.0/24", ["10.1.2.*"]),
    ("10.1.2.3/32", ["10.1.2.3"]),
    ("10.0.0.0/23", ["10.0.0.*", "10.0.1.*"]),
    ("10.0.0.16/28", ["10.0.0.16", "10.0.0.17", "10.0.0.18", "10.0.0.19", "10.0.0.2?", "10.0.0.30", "10.0.0.31"]),
    ("10.0.0.0/25", ["10.0.0.?", "10.0.0.??", "10.0.0.10?", "10.0.0.11?"] + [f"10.0.0.{n}" for n in range(120, 128)]),
    ("0.0.0.0/0", None),  # not a jump-host grant: every ssh would go through the bastion
    ("8.0.0.0/7", None),
])
def test_ipv4_patterns_table(network, expected):
    assert ipv4_patterns(IPv4Network(network)) == expected


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(8, 32), st.lists(st.integers(0, 2**32 - 1), max_size=20))
def test_ipv4_patterns_match_inside_and_nothing_outside(base, prefix, probes):
    network = IPv4Network((base, prefix), strict=False)
    patterns = ipv4_patterns(network)
    assert patterns is not None
    first, last = int(network.network_address), int(network.broadcast_address)
    edges = [first, last, first - 1, last + 1, *probes]
    for number in (n for n in edges if 0 <= n < 2**32):
        address = IPv4Address(number)
        assert openssh_matches(patterns, str(address)) == (address in network), (network, address, patterns)


@pytest.mark.parametrize("network, expected, inside, outside", [
    ("fd00::1/128", ["fd00::1"], ["fd00::1"], ["fd00::2"]),
    ("fd00:1:2:3::/64", ["fd00:1:2:3:*"], ["fd00:1:2:3::1", "fd00:1:2:3:4:5:6:7"], ["fd00:1:2:4::1", "fd00:1:2:30::1"]),
    ("fd00:1::/32", ["fd00:1:*"], ["fd00:1::1", "fd00:1:ffff::"], ["fd00:10::1", "fd00:2::1"]),
    ("fd00:1::/64", None, [], []),  # a zero group: '::' may fall inside the prefix, no text pattern is exact
    ("fd00::/56", None, [], []),  # not on a 16-bit boundary
])
def test_ipv6_patterns_table(network, expected, inside, outside):
    patterns = ipv6_patterns(IPv6Network(network))
    assert patterns == expected
    for text in inside:
        assert openssh_matches(patterns, str(IPv6Address(text))), text
    for text in outside:
        assert not openssh_matches(patterns, str(IPv6Address(text))), text


def test_known_hosts_lines_bracket_a_non_standard_port_and_drop_comments():
    keys = ["ssh-ed25519 AAAAC3Nza bastion host key"]
    assert known_hosts_lines("bastion.example.com", 22, keys) == ["bastion.example.com ssh-ed25519 AAAAC3Nza"]
    assert known_hosts_lines("10.0.0.1", 2222, keys) == ["[10.0.0.1]:2222 ssh-ed25519 AAAAC3Nza"]


@pytest.mark.parametrize("text, expected", [
    ("bastion.example.com", ("bastion.example.com", None)),
    ("bastion.example.com:2222", ("bastion.example.com", 2222)),
    ("[fd00::1]:22", ("fd00::1", 22)),
    ("fd00::1", ("fd00::1", None)),
])
def test_split_public_name(text, expected):
    assert split_public_name(text) == expected


# ---- the whole text, read by the real OpenSSH client ---------------------------------------------------

POLICY = """\
[groups.ops]
allow = ["10.20.0.0/16:22", "*.db.corp.internal:5432", "[fd00:1::/64]:22", "172.16.0.0/12"]

[users.alice]
groups = ["ops"]
allow = ["10.1.2.3:22,8000-8100", "git.corp.internal", "10.0.0.0/24:22",
         {target = "10.9.9.9:22", expires = 2026-01-01T00:00:00Z}]
deny = ["10.20.0.9"]

[users.bob]
allow = ["10.5.5.5:5432"]

[users.carol]
expires = 2026-01-01T00:00:00Z
allow = ["10.1.2.3:22"]
"""
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHs1EHh3W2vmOo9yAU9wNQU6aWHO3lQSVYYHwIsE+C5B"


def render(user: str, **setup) -> str:
    setup = {"host": "10.0.0.1", "port": 22, **setup}
    return render_ssh_config(ClientSetup(user=user, **setup), parse_policy(POLICY), [HOST_KEY], NOW)


def test_rendered_config_lists_what_it_cannot_route():
    text = render("alice", identity_file="~/.ssh/id ed25519")
    assert "    IdentityFile \"~/.ssh/id ed25519\"\n" in text
    assert "#      10.0.0.1 ssh-ed25519 AAAA" in text  # the pin, ready to copy
    assert "[fd00:1::/64]:22" in text.split("not expressible")[1]
    assert "ssh -N -L 5432:host.db.corp.internal:5432 bastion" in text
    assert "10.20.0.9  users.alice.deny" in text
    assert "10.9.9.9" not in text  # an expired grant is gone
    assert "Match host" not in render("bob")  # no port-22 grant: nothing to route
    assert "ssh -N -L 5432:10.5.5.5:5432 bastion" in render("bob")
    assert "expired at 2026-01-01T00:00:00Z: ask your bastion admin" in render("carol")
    assert "may not reach any target yet: ask your bastion admin" in render("nobody")


ROUTES = [  # (host typed, jumps through the bastion?)
    ("10.20.5.6", True),
    ("10.20.0.9", True),  # denied, but routing is not access: the bastion refuses it with a reason
    ("10.21.0.1", False),
    ("10.1.2.3", True),
    ("10.1.2.30", False),
    ("10.0.0.77", True),
    ("10.0.0.1", False),  # the bastion itself, although 10.0.0.0/24 covers it
    ("172.16.0.1", True),
    ("172.31.255.254", True),
    ("172.32.0.1", False),
    ("git.corp.internal", True),
    ("pg.db.corp.internal", False),  # granted on 5432 only: use -L
    ("10.9.9.9", False),  # expired grant
    ("example.com", False),
]


@pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (Debian: openssh-client)")
def test_openssh_routes_exactly_the_granted_targets_through_the_bastion(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(render("alice", identity_file=str(tmp_path / "id"), known_hosts_file=str(tmp_path / "kh")))

    def resolved(host: str) -> dict[str, str]:
        result = subprocess.run([SSH, "-G", "-F", config, host], capture_output=True, text=True, timeout=10,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)

    bastion = resolved("bastion")
    assert (bastion["hostname"], bastion["port"], bastion["user"]) == ("10.0.0.1", "22", "alice")
    assert bastion["stricthostkeychecking"] == "true" and bastion["userknownhostsfile"] == str(tmp_path / "kh")
    assert bastion["identityfile"] == str(tmp_path / "id") and bastion["identitiesonly"] == "yes"
    assert "proxyjump" not in bastion  # `ProxyJump none`: never a jump to itself
    routed = {host: resolved(host).get("proxyjump") == "bastion" for host, _ in ROUTES}
    assert routed == dict(ROUTES)


# ---- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A home made once for this module's read-only command tests (host key generation is the slow part)."""
    home = tmp_path_factory.mktemp("ssh-config") / "home"
    config = Config(home=home, listen="127.0.0.1:2222", public_name="bastion.example.com")
    initialize(config)
    store = Store(config.database)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz alice@example"
    store.add_user("alice", parse_public_keys(key))
    store.apply_policy(parse_policy('[users.alice]\nallow = ["10.1.2.0/24:22"]\n'))
    store.close()
    (home / "config.toml").write_text((home / "config.toml").read_text()
                                      .replace('public_name = ""', 'public_name = "bastion.example.com"'))
    return home


def cli(home: Path, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), *args], env={"BASTION_HOME": None})


def test_command_pins_the_host_keys_init_wrote(home):
    pins = [" ".join(p.read_text().split()[:2]) for p in sorted(home.glob("ssh_host_*_key.pub"))]
    assert len(pins) == 2

    # defaults: --host from public_name, --port from the listen address
    result = cli(home, "ssh-config", "alice")
    assert result.exit_code == 0, result.output
    assert "Host bastion\n    HostName bastion.example.com\n    Port 2222\n    User alice\n" in result.stdout
    assert "Match host 10.1.2.*,!bastion.example.com\n    ProxyJump bastion\n" in result.stdout

    # --known-hosts: only the lines, ready for >> ~/.ssh/known_hosts
    result = cli(home, "ssh-config", "alice", "--host", "10.0.0.1", "--port", "22", "--known-hosts")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"10.0.0.1 {pin}" for pin in pins]


def test_command_refuses_unknown_users_and_bad_hosts(home):
    result = cli(home, "ssh-config", "mallory")
    assert "no user named 'mallory'" in str(result.exception)
    result = cli(home, "ssh-config", "alice", "--host", "bad host")
    assert result.exit_code != 0 and "--host 'bad host'" in str(result.exception)
