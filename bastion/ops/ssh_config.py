"""What a user pastes into `~/.ssh/config` and `~/.ssh/known_hosts` to use the bastion: a `Host bastion`
entry, a `Match host` block that jumps through it to every target the user may reach on port 22, and the
bastion's host keys as known_hosts lines, so the first connection needs no trust-on-first-use.

Pure: the caller reads the policy and the host keys; `render_ssh_config` only turns values into text.

How grants become OpenSSH patterns (OpenSSH has `*` and `?` wildcards over the text of the host name,
and no CIDR matching for targets):

* an IPv4 address is itself; a CIDR becomes one pattern per possible value of its partial octet
  ("172.16.0.0/12" -> "172.16.*" ... "172.31.*"), and inside the last octet `?` compresses decimal
  ranges ("10.0.0.0/25" -> "10.0.0.?", "10.0.0.??", "10.0.0.10?", ...). `?` is used only in the last
  octet: elsewhere it could match a dot and reach addresses outside the network;
* an IPv6 address is its RFC 5952 short form; a CIDR on a 16-bit boundary whose groups are all
  non-zero becomes "fd00:1:2:3:*"; others cannot be matched as text and are listed as comments;
* a name pattern stays as written, but OpenSSH's `*` also crosses dots, so "*.corp.internal" routes
  "a.b.corp.internal" through the bastion too (which then refuses it): routing only, never access.

Grants that do not cover port 22 get no pattern (ssh to them would be refused); they are listed with
a `-L` example instead. The bastion decides every channel regardless of what this file says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Address, IPv6Network

from ..policy.model import Policy, TargetRule, format_time

MAX_PATTERNS = 256
"""More patterns than this for one rule is not a config anyone should read; the rule is listed instead."""

SSH_PORT = 22
_SAFE_WORD = re.compile(r"[A-Za-z0-9_.,:/@%+=~-]+", re.ASCII)


@dataclass(frozen=True, slots=True)
class ClientSetup:
    """Who connects and how: the values of `bastion ssh-config NAME --host ... [--port] [--identity-file]
    [--certificate-file]`."""

    user: str
    host: str  # the bastion's name or address as users reach it
    port: int = SSH_PORT
    identity_file: str | None = None
    known_hosts_file: str | None = None
    alias: str = "bastion"
    certificate_file: str | None = None  # an OpenSSH user certificate (#21), e.g. ~/.ssh/id_ed25519-cert.pub


def octet_patterns(low: int, high: int) -> list[str]:
    """Decimal patterns with trailing `?` that match exactly the numbers low..high (0 <= low <= high <= 255).

    Numbers of each digit count are handled apart ("?" is 0-9, "??" is 10-99), then split greedily into
    the widest aligned blocks: 100-127 -> "10?", "11?", "120", ... "127".
    """
    if not 0 <= low <= high <= 255:
        raise ValueError(f"octet range {low}-{high} is outside 0-255")
    patterns = []
    for digits, (first, last) in enumerate(((0, 9), (10, 99), (100, 999)), start=1):
        start, stop = max(low, first), min(high, last)
        if (start, stop) == (first, last):
            patterns.append("?" * digits)  # every number with this many digits
            continue
        while start <= stop:
            width = 0  # how many trailing digits become '?'; at least one digit stays literal
            while width < digits - 1:
                block = 10 ** (width + 1)
                if start % block or start + block - 1 > stop:
                    break
                width += 1
            patterns.append(str(start)[: digits - width] + "?" * width)
            start += 10**width
    return patterns


def ipv4_patterns(network: IPv4Network) -> list[str] | None:
    """Patterns matching exactly the dotted-quad text of every address in `network`, or None if there
    would be more than MAX_PATTERNS (or the network is wider than /8: that is not a jump-host grant)."""
    if network.prefixlen < 8:
        return None
    octets = network.network_address.packed
    whole, partial_bits = divmod(network.prefixlen, 8)
    head = ".".join(str(o) for o in octets[:whole])
    if partial_bits == 0:
        return [head] if whole == 4 else [f"{head}.*"]
    low = octets[whole]
    high = low + 2 ** (8 - partial_bits) - 1
    if whole == 3:
        values = octet_patterns(low, high)
        tail = ""
    else:
        values = [str(v) for v in range(low, high + 1)]
        tail = ".*"
    if len(values) > MAX_PATTERNS:
        return None
    return [f"{head}.{value}{tail}" for value in values]


def ipv6_patterns(network: IPv6Network) -> list[str] | None:
    """The short form of a single address, or "g1:g2:*" for a network on a 16-bit boundary whose groups
    are all non-zero (then no '::' can fall inside the prefix, so the text always starts with them)."""
    if network.prefixlen == 128:
        return [str(network.network_address)]
    groups = network.network_address.exploded.split(":")
    count, rest = divmod(network.prefixlen, 16)
    if rest or count == 0:
        return None
    prefix = [group.lstrip("0") for group in groups[:count]]
    if any(not group for group in prefix):
        return None
    return [":".join(prefix) + ":*"]


def rule_patterns(rule: TargetRule) -> list[str] | None:
    """OpenSSH host patterns for the hosts of `rule` (ports aside), or None when they cannot be written."""
    if rule.name_pattern is not None:
        return [rule.name_pattern]
    assert rule.network is not None
    if isinstance(rule.network, IPv4Network):
        return ipv4_patterns(rule.network)
    return ipv6_patterns(rule.network)


def known_hosts_lines(host: str, port: int, public_keys: list[str]) -> list[str]:
    """One known_hosts line per host key ("TYPE BASE64 [comment]"), for `host` as ssh will look it up:
    "[host]:port" unless the port is 22."""
    field = host if port == SSH_PORT else f"[{host}]:{port}"
    return [f"{field} {' '.join(key.split()[:2])}" for key in public_keys]


def _value(text: str) -> str:
    """A config value, quoted when it holds anything but plain path and name characters."""
    if _SAFE_WORD.fullmatch(text):
        return text
    if '"' in text or "\n" in text:
        raise ValueError(f"{text!r} cannot be written in an ssh config file")
    return f'"{text}"'


def _forward_example(rule: TargetRule, alias: str) -> str:
    port = rule.ports.ranges[0][0]
    if rule.name_pattern is not None:
        host = rule.name_pattern.replace("*", "host")
    else:
        assert rule.network is not None
        address = rule.network.network_address
        if rule.network.num_addresses > 1:
            address = next(rule.network.hosts())
        host = f"[{address}]" if isinstance(address, IPv6Address) else str(address)
    local = port if port >= 1024 else port + 10000
    return f"ssh -N -L {local}:{host}:{port} {alias}"


def render_ssh_config(
    setup: ClientSetup, policy: Policy, host_public_keys: list[str], now: datetime, generated_by: str = ""
) -> str:
    """The whole text: instructions and known_hosts lines as comments, `Host ALIAS`, then `Match host`."""
    alias = setup.alias
    known = known_hosts_lines(setup.host, setup.port, host_public_keys)
    where = setup.known_hosts_file or "~/.ssh/known_hosts"
    lines = [
        f"# OpenSSH client configuration for {setup.user} through the bastion {setup.host}:{setup.port},",
        f"# made by {generated_by or '`bastion ssh-config`'} at {format_time(now.replace(microsecond=0))}.",
        f"# 1. Add the bastion's host keys to {where}; then the first connection needs no trust-on-first-use:",
        *(f"#      {line}" for line in known),
        "#    (`bastion ssh-config ... --known-hosts` prints them alone.)",
        "# 2. Add the rest of this text to ~/.ssh/config (or use it with `ssh -F FILE`).",
        "",
        f"Host {alias}",
        f"    HostName {_value(setup.host)}",
        f"    Port {setup.port}",
        f"    User {_value(setup.user)}",
    ]
    identity_file = setup.identity_file
    if identity_file is None and setup.certificate_file and setup.certificate_file.endswith("-cert.pub"):
        identity_file = setup.certificate_file.removesuffix("-cert.pub")  # ssh's own pairing: KEY and KEY-cert.pub
    if identity_file:
        lines += [f"    IdentityFile {_value(identity_file)}", "    IdentitiesOnly yes"]
    if setup.certificate_file:
        lines.append(f"    CertificateFile {_value(setup.certificate_file)}")
    if setup.known_hosts_file:
        lines.append(f"    UserKnownHostsFile {_value(setup.known_hosts_file)}")
    lines += [
        "    # The host key must be the one above: a changed key is refused, never accepted silently.",
        "    StrictHostKeyChecking yes",
        "    # The bastion itself is never reached through a jump (a grant covering it would loop).",
        "    ProxyJump none",
        "    ForwardAgent no",
        "    ForwardX11 no",
        "",
    ]
    if policy.cas and not setup.certificate_file:
        lines[-1:-1] = [
            "    # With a user certificate (`bastion ca sign` or your CA), no key of yours is stored at the bastion:",
            "    # keep it beside its key as id_ed25519-cert.pub (ssh offers it by itself), or name it here:",
            "    #   CertificateFile ~/.ssh/id_ed25519-cert.pub",
        ]

    user = policy.users.get(setup.user)
    if user is not None and user.expires is not None and now >= user.expires:
        lines.append(f"# {setup.user}'s access expired at {format_time(user.expires)}: ask your bastion admin to renew it.")
        return "\n".join(lines) + "\n"
    grants = [(origin, rule) for origin, rule in policy.grants_for(setup.user) if not rule.expired(now)]
    jump: list[tuple[str, TargetRule, list[str]]] = []
    unmatched: list[tuple[str, TargetRule]] = []
    other_ports: list[tuple[str, TargetRule]] = []
    for origin, rule in grants:
        if SSH_PORT not in rule.ports:
            other_ports.append((origin, rule))
            continue
        patterns = rule_patterns(rule)
        if patterns is None:
            unmatched.append((origin, rule))
        else:
            jump.append((origin, rule, patterns))

    patterns = list(dict.fromkeys(p for _, _, found in jump for p in found if p != setup.host))
    if patterns:
        width = max(len(rule.text) for _, rule, _ in jump)
        lines.append(f"# Through the bastion: what {setup.user} may reach on port 22.")
        lines += [f"#   {rule.text:<{width}}  {origin}{_until(rule)}" for origin, rule, _ in jump]
        lines += [
            "# Match host compares the name you type (or a HostName set before this block) with the patterns.",
            f"Match host {','.join(patterns)},!{setup.host}",
            f"    ProxyJump {alias}",
            "",
        ]
    elif jump:
        lines.append(f"# On port 22 at the bastion's own address (no pattern can route it); use: ssh -J {alias} HOST")
        lines += [f"#   {rule.text}  {origin}{_until(rule)}" for origin, rule, _ in jump]
    elif not grants:
        lines.append(f"# {setup.user} may not reach any target yet: ask your bastion admin for a grant.")
    denials = [(origin, rule) for origin, rule in policy.denials_for(setup.user) if not rule.expired(now)]
    if denials and grants:
        lines.append("# Denied even where a grant above covers them (deny wins):")
        lines += [f"#   {rule.text}  {origin}" for origin, rule in denials]
    if unmatched:
        lines.append(f"# Also on port 22, but not expressible as OpenSSH patterns; use: ssh -J {alias} HOST")
        lines += [f"#   {rule.text}  {origin}{_until(rule)}" for origin, rule in unmatched]
    if other_ports:
        lines.append("# Other ports: forward them with -L (or -D for a SOCKS proxy), for example")
        lines.append(f"#   {_forward_example(other_ports[0][1], alias)}")
        lines += [f"#   {rule.text}  {origin}{_until(rule)}" for origin, rule in other_ports]
    return "\n".join(lines).rstrip("\n") + "\n"


def _until(rule: TargetRule) -> str:
    return f" (until {format_time(rule.expires)})" if rule.expires is not None else ""


def split_public_name(text: str) -> tuple[str, int | None]:
    """`public_name` from config.toml as (host, port): "bastion.example.com", "host:2222", "[fd00::1]:22"."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, colon, port = text.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        return host, int(port)
    return text, None
