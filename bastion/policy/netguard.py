"""Which target addresses the bastion may ever dial, and what a target host text means.

Two jobs that belong together because both stand between a client's words and `connect()`:

* `parse_host` turns the host of a channel request into either a canonical IP address or a
  lowercase DNS name. Anything the C resolver would read as an address ("127.1", "0x7f000001",
  "::ffff:127.0.0.1") comes back as that address, so no numeric trick can pass as a *name* and
  slip past address rules. Everything else that is not a plain hostname is refused.
* `NetGuard.refusal` says whether an address may be reached at all, before any policy rule is
  looked at: only addresses inside the operator's internal networks, and never loopback,
  link-local (cloud metadata at 169.254.169.254), the cloud metadata and platform services that
  live inside private ranges (fd00:ec2::254, 100.100.100.200, ...), multicast, unspecified,
  broadcast, reserved or the bastion's own addresses -- unless the operator named such a range
  explicitly.

Pure: no I/O, no DNS, no clock. Whether an address is one of this host's own *right now* is a
question about the host, so the guard asks it through the `is_local` it is given
(`local_addresses.is_local_address` asks the kernel at the moment of the decision; tests pass a
plain function).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_network,
)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

DEFAULT_INTERNAL_NETWORKS: tuple[IPNetwork, ...] = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
    IPv4Network("100.64.0.0/10"),
    IPv6Network("fc00::/7"),
)

MAX_NAME_LENGTH = 253
"""Longest DNS name in text form, without the trailing dot (RFC 1035)."""

_MAPPED_PREFIX = IPv6Network("::ffff:0:0/96")

# Ranges that reach the bastion itself; named even when they are outside every internal network,
# because "is a loopback address" tells the client more than "is not in an internal network".
_SELF_RANGES: tuple[tuple[IPNetwork, str], ...] = (
    (IPv4Network("127.0.0.0/8"), "is a loopback address"),
    (IPv6Network("::1/128"), "is a loopback address"),
    (IPv4Network("0.0.0.0/8"), "is an unspecified address"),
    (IPv6Network("::/128"), "is an unspecified address"),
)
_METADATA = "is a cloud metadata address"
_PLATFORM = "is a cloud platform service address"
# Ranges that are only worth naming when some (too wide) internal network contains them.
# Narrower ranges come before the ranges that contain them, so the narrower name wins (the
# broadcast address before 240/4, fd00:ec2::254 before fd00:ec2::/32).
#
# The first block: cloud metadata and platform services that are *not* link-local. Most clouds
# serve metadata at 169.254.169.254 (refused below as link-local), but their IPv6 endpoints sit in
# fc00::/7 and Alibaba's in 100.64.0.0/10 -- ranges an operator lists as internal as a matter of
# course. They answer with the instance's credentials, so each is refused unless listed exactly,
# as a /32 or /128, the same rule as every other special range (its own prefix length).
_SPECIAL_RANGES: tuple[tuple[IPNetwork, str], ...] = (
    (IPv6Network("fd00:ec2::254/128"), _METADATA),  # AWS instance metadata (IMDS), Nitro
    (IPv6Network("fd00:ec2::23/128"), _METADATA),  # AWS EKS Pod Identity agent: hands out credentials
    (IPv6Network("fd00:ec2::253/128"), _PLATFORM),  # AWS Route 53 resolver
    (IPv6Network("fd00:ec2::123/128"), _PLATFORM),  # AWS time sync (NTP)
    (IPv6Network("fd00:ec2::/32"), _PLATFORM),  # AWS's block for the above and whatever comes next
    (IPv6Network("fd20:ce::254/128"), _METADATA),  # Google Cloud, IPv6-only instances
    (IPv6Network("fd00:c1::a9fe:a9fe/128"), _METADATA),  # Oracle Cloud
    (IPv6Network("fd00:42::42/128"), _METADATA),  # Scaleway
    (IPv6Network("fd00:a9fe:a9fe::1/128"), _METADATA),  # Akamai (Linode)
    (IPv4Network("100.100.100.200/32"), _METADATA),  # Alibaba Cloud, inside 100.64.0.0/10
    # Tailscale's resolver (and Taildrive), answered by tailscaled on this host itself; also inside
    # 100.64.0.0/10, and not an interface address, so the own-address check cannot see it.
    (IPv4Network("100.100.100.100/32"), "is a host-local service address"),
    (IPv4Network("168.63.129.16/32"), _PLATFORM),  # Azure WireServer (a public address)
    (IPv4Network("192.0.0.192/32"), _METADATA),  # Oracle Cloud Classic
    (IPv4Network("169.254.0.0/16"), "is a link-local address"),
    (IPv6Network("fe80::/10"), "is a link-local address"),
    (IPv4Network("224.0.0.0/4"), "is a multicast address"),
    (IPv6Network("ff00::/8"), "is a multicast address"),
    (IPv4Network("255.255.255.255/32"), "is the broadcast address"),
    (IPv4Network("240.0.0.0/4"), "is a reserved address"),
)

# One part of a glibc inet_aton address: decimal, octal (leading 0) or hex (0x). An octal part
# with an 8 or 9 in it, or "0x" with no digits, is refused by glibc too.
_INET_ATON_PART = re.compile(r"[1-9][0-9]*|0[0-7]*|0[xX][0-9a-fA-F]+", re.ASCII)
# A final label that makes the resolver try the text as a number ("foo.123", "1.0x7f"); no
# top-level domain is numeric, so such text is an address or nothing.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*", re.ASCII)
# Letters, digits, '_' (SRV-style and some internal names) and '-' but not at either end, so a
# name can never look like a command-line option.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", re.ASCII)
# Bounds the work done on hostile input; the longest valid host is a 253-character name.
_MAX_HOST_TEXT = MAX_NAME_LENGTH + 1


class TargetError(ValueError):
    """A target host or port a client asked for is malformed; the message is safe to show it."""


def parse_host(text: str) -> IPAddress | str:
    """Return the canonical address `text` denotes, or its lowercase DNS name.

    Numeric forms are read the way glibc's inet_aton/getaddrinfo read them, so that the address
    checked here is the address that would be dialed. Raises `TargetError` for anything else.
    """
    if not isinstance(text, str):
        raise TargetError("target host must be text")
    _check_characters(text, "target host")
    if len(text) > _MAX_HOST_TEXT:
        raise TargetError("target host is too long")
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")):
            raise TargetError("target host has unbalanced brackets")
        return _parse_ipv6(text[1:-1])
    if ":" in text or "%" in text:
        return _parse_ipv6(text)
    # A single trailing dot is legal DNS ("host.example."); "127.0.0.1." must still be an address.
    bare = text[:-1] if text.endswith(".") else text
    labels = bare.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return _parse_inet_aton(labels)
    if len(bare) > MAX_NAME_LENGTH:
        raise TargetError("target host name is too long")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise TargetError("target host is not a valid host name")
    return bare.lower()


def canonical_address(addr: IPAddress) -> IPAddress:
    """Return `addr` with an IPv4-mapped IPv6 address (::ffff:a.b.c.d) unmapped to IPv4.

    The kernel dials a mapped address as IPv4, so every check must see the IPv4 form.
    """
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def canonical_network(network: IPNetwork) -> IPNetwork:
    """Return `network` as IPv4 when it lies inside ::ffff:0:0/96, so it matches canonical addresses."""
    if isinstance(network, IPv6Network) and network.subnet_of(_MAPPED_PREFIX):
        base = network.network_address.ipv4_mapped
        assert base is not None
        return IPv4Network((base, network.prefixlen - 96))
    return network


def parse_port(value: int | str) -> int:
    """Return the TCP port `value` names, 1..65535; anything else raises `TargetError`."""
    if isinstance(value, bool):  # bool is an int; True is not port 1
        raise TargetError("port must be a number from 1 to 65535")
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise TargetError("port must be a number from 1 to 65535")
        if len(value) > 5:
            raise TargetError("port is out of range 1-65535")
        if value[0] == "0" and len(value) > 1:  # "022" reads as octal to some tools
            raise TargetError("port must be written without leading zeros")
        value = int(value)
    if not isinstance(value, int):
        raise TargetError("port must be a number from 1 to 65535")
    if not 1 <= value <= 65535:
        shown = value if abs(value) < 10**6 else "number"  # keep the message short
        raise TargetError(f"port {shown} is out of range 1-65535")
    return value


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR texts such as "10.0.0.0/8" and "fd00::/8" for the `internal_networks` setting.

    Host bits set ("10.0.0.1/8") are an error rather than silently widened: the operator probably
    meant something else, and a guess here decides what the bastion may reach.
    """
    if isinstance(items, str):
        raise TypeError("parse_networks() takes a list of networks, not one string")
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"network {item!r} must be text such as '10.0.0.0/8'")
        if "%" in item:
            raise ValueError(f"network {item!r} has an IPv6 zone id; write it without '%...'")
        try:
            network = ip_network(item, strict=True)
        except ValueError as err:
            raise ValueError(f"network {item!r} is not valid: {err}; "
                             "expected a CIDR such as '10.0.0.0/8' with no host bits set") from None
        networks.append(canonical_network(network))
    return tuple(networks)


IsLocal = Callable[[IPAddress], bool]
"""Whether an address is assigned to this host now; may raise OSError when it cannot tell."""


@dataclass(frozen=True, slots=True)
class NetGuard:
    """The outer fence: which addresses may be dialed at all, whatever the policy grants.

    `refusal` checks, in order:
    1. own addresses in `own_addresses`, loopback and unspecified (they reach the bastion itself)
       -> named reason;
    2. not inside any internal network -> "is not in an internal network";
    3. cloud metadata and platform services, link-local, multicast, broadcast, reserved -> named
       reason;
    4. `is_local(addr)` says the address is this host's own now -> "is the bastion's own address";
    each of 1, 3 and 4 is lifted only when an internal network that contains the address is no
    wider than the special range (for own addresses: the exact /32 or /128). So "0.0.0.0/0" as an
    internal network opens the public internet but not loopback or 169.254.169.254; listing
    "127.0.0.0/8" or "127.0.0.2/32" opens those on purpose.

    `is_local` is asked last, only about an address every other check let through, so a refusal
    costs no question to the host. Opening a loopback range does not open the bastion's own
    addresses inside it (127.0.0.1): only listing one exactly does. When `is_local` raises
    OSError the address is refused: nobody could tell whether it is this host.
    """

    internal_networks: tuple[IPNetwork, ...] = DEFAULT_INTERNAL_NETWORKS
    own_addresses: frozenset[IPAddress] = frozenset()
    is_local: IsLocal | None = None

    def __post_init__(self) -> None:
        # Canonical forms once here so `refusal` compares like with like.
        object.__setattr__(self, "internal_networks",
                           tuple(canonical_network(n) for n in self.internal_networks))
        object.__setattr__(self, "own_addresses",
                           frozenset(canonical_address(a) for a in self.own_addresses))

    def refusal(self, addr: IPAddress) -> str | None:
        """Return None when `addr` may be reached, else a short reason starting with the address."""
        addr = canonical_address(addr)
        exact = self._opened(addr, addr.max_prefixlen)
        if addr in self.own_addresses and not exact:
            return f"{addr} is the bastion's own address"
        for special, reason in _SELF_RANGES:
            if _contains(special, addr) and not self._opened(addr, special.prefixlen):
                return f"{addr} {reason}"
        if not any(_contains(network, addr) for network in self.internal_networks):
            return f"{addr} is not in an internal network"
        for special, reason in _SPECIAL_RANGES:
            if _contains(special, addr) and not self._opened(addr, special.prefixlen):
                return f"{addr} {reason}"
        if self.is_local is not None and not exact:
            try:
                local = self.is_local(addr)
            except OSError:
                return f"{addr} could not be checked against the bastion's own addresses"
            if local:
                return f"{addr} is the bastion's own address"
        return None

    def _opened(self, addr: IPAddress, prefixlen: int) -> bool:
        """True when an internal network at least as narrow as `prefixlen` contains `addr`."""
        return any(network.prefixlen >= prefixlen and _contains(network, addr)
                   for network in self.internal_networks)


def _contains(network: IPNetwork, addr: IPAddress) -> bool:
    return network.version == addr.version and addr in network


def _check_characters(text: str, what: str) -> None:
    """Refuse empty text and any character that can hide, split or disguise a host name."""
    if not text:
        raise TargetError(f"{what} is empty")
    if text.isascii() and text.isprintable() and " " not in text:
        return  # the common case, checked in C
    for char in text:
        if char == "\0":
            raise TargetError(f"{what} contains a NUL byte")
        if ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F:
            raise TargetError(f"{what} contains a control character")
        if char.isspace():
            raise TargetError(f"{what} contains whitespace")
    raise TargetError(f"{what} contains a non-ASCII character")


def _parse_ipv6(text: str) -> IPAddress:
    if "%" in text:
        raise TargetError("target host has an IPv6 zone id, which is not allowed")
    try:
        return canonical_address(IPv6Address(text))
    except ValueError:
        raise TargetError("target host is not a valid IPv6 address") from None


def _parse_inet_aton(labels: list[str]) -> IPv4Address:
    """Read "a", "a.b", "a.b.c" or "a.b.c.d" as glibc's inet_aton does; the last part fills
    the remaining bytes ("127.1" is 127.0.0.1, "2130706433" is 127.0.0.1)."""
    if len(labels) > 4 or not all(_INET_ATON_PART.fullmatch(p) for p in labels):
        raise TargetError("target host is not a valid IPv4 address")
    values = [int(p, 0) if not _is_octal(p) else int(p, 8) for p in labels]
    *leading, last = values
    if any(v > 0xFF for v in leading) or last >= 1 << (8 * (4 - len(leading))):
        raise TargetError("target host is not a valid IPv4 address")
    number = last
    for i, value in enumerate(leading):
        number |= value << (8 * (3 - i))
    return IPv4Address(number)


def _is_octal(part: str) -> bool:
    return len(part) > 1 and part[0] == "0" and part[1] not in "xX"

