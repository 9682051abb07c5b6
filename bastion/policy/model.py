"""Who may reach which host and port: the policy's values (rules, users, groups, requests, decisions).
The pure decisions over them are in decide.py.

`decide.evaluate(policy, guard, request)` decides one channel request. It is deny-by-default, and the
first step that applies decides:

1. unknown user                                   -> deny "unknown user"
2. the user has expired (now >= expires)          -> deny "access for USER expired at TIME"
3. the host resolved to no address                -> deny
4. the network guard refuses any of the addresses -> deny with the guard's reason
   (loopback, metadata, outside the internal networks; see `netguard.NetGuard`)
5. a deny rule (the user's own, then its groups', in the order listed) matches the host name or
   any address, on the port                       -> deny "HOST:PORT is denied by policy"
6. some address is matched by no allow rule       -> deny "USER may not reach HOST:PORT"
7. otherwise allow, naming the first allow rule that matched the first address.

Why every address, in steps 4-6: the client's name may resolve to several addresses and the
connector may use any of them, so one bad address spoils the request. Rules whose own `expires`
has passed are skipped as if absent. A user naming a group missing from the policy gets nothing
from it; `Policy.problems()` reports that.

Name rules ("*.db.corp.internal") match the host as the client asked for it, so they trust DNS;
address rules match what the name resolved to. A deny on a name is therefore advisory (another
name may resolve to the same address); deny the address when it matters.

Pure: no asyncssh, SQLite, clock or logging. Time arrives on the request.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType

from .netguard import (
    IPAddress,
    IPNetwork,
    TargetError,
    canonical_address,
    canonical_network,
    parse_host,
    parse_port,
)

NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_.-]{0,31}", re.ASCII)
"""User and group names: POSIX-user-name-like, so they are safe in logs, paths and shells."""
NAME_HINT = "lowercase letters, digits, '_', '.', '-', starting with a letter or '_', at most 32"

DEFAULT_PORT = 22

# What a refused user should ask the admin for: the reason reaches their ssh client verbatim.
ASK_GRANT = "; ask your bastion admin for a grant"
ASK_RENEWAL = "; ask your bastion admin to renew it"
ASK_EXCEPTION = "; ask your bastion admin if you need it"
ASK_ACCESS = "; ask your bastion admin for access"
_MAX_RULE_TEXT = 4096  # a long port list is legitimate; 10,000 characters is not
_PREFIX = re.compile(r"0|[1-9][0-9]{0,2}", re.ASCII)


class PolicyError(ValueError):
    """A rule, name or policy value is malformed; the message says which and how."""


def _quote(text: str) -> str:
    """`text` quoted for a message, cut short: rule text can be long and hostile."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


def valid_name(name: object) -> bool:
    """True when `name` may name a user or group (`NAME_PATTERN`)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def format_time(moment: datetime) -> str:
    """ISO 8601 in UTC with a 'Z', e.g. "2027-01-31T00:00:00Z" -- the one time format shown."""
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class PortSet:
    """A set of TCP ports as inclusive ranges, sorted and merged so equal sets compare equal."""

    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def from_ranges(cls, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> PortSet:
        merged: list[tuple[int, int]] = []
        for low, high in sorted(ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        return cls(tuple(merged))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(low <= port <= high for low, high in self.ranges)

    def __str__(self) -> str:
        if self.ranges == ((1, 65535),):
            return "*"
        return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges)


ALL_PORTS = PortSet(((1, 65535),))
SSH_PORT = PortSet(((DEFAULT_PORT, DEFAULT_PORT),))


def parse_ports(text: str) -> PortSet:
    """Parse "22", "8000-8100", "22,443,8000-8100" or "*" (all ports)."""
    if text == "*":
        return ALL_PORTS
    ranges = []
    for item in text.split(","):
        low_text, dash, high_text = item.partition("-")
        if not low_text or (dash and not high_text):
            raise PolicyError(f"port list {_quote(text)} has an empty item; expected N, N-M, a list or '*'")
        try:
            low = parse_port(low_text)
            high = parse_port(high_text) if dash else low
        except TargetError as err:
            raise PolicyError(f"port list {_quote(text)}: {err}") from None
        if low > high:
            raise PolicyError(f"port range {_quote(item)} runs backwards; expected LOW-HIGH")
        ranges.append((low, high))
    return PortSet.from_ranges(ranges)


@dataclass(frozen=True, slots=True)
class TargetRule:
    """One "HOST[:PORTS]" grant or denial, as written and as parsed.

    `name_pattern` is a lowercase DNS name in which '*' matches zero or more characters *within
    one label*: "*.db.corp.internal" matches "pg1.db.corp.internal" but neither
    "db.corp.internal" nor "a.pg1.db.corp.internal". Staying inside a label keeps a grant from
    reaching deeper subdomains nobody reviewed.
    """

    text: str
    network: IPNetwork | None
    name_pattern: str | None
    ports: PortSet
    expires: datetime | None = None

    def __post_init__(self) -> None:
        if (self.network is None) == (self.name_pattern is None):
            raise ValueError("a TargetRule has exactly one of network and name_pattern")

    def matches(self, host: IPAddress | str, address: IPAddress, port: int) -> bool:
        """True when `port` is covered and the rule's network holds `address` (address rules)
        or its pattern matches `host` when the client asked for a name (name rules)."""
        if port not in self.ports:
            return False
        if self.network is not None:
            address = canonical_address(address)
            return self.network.version == address.version and address in self.network
        assert self.name_pattern is not None
        return isinstance(host, str) and name_matches(self.name_pattern, host)

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


def parse_target_rule(text: str, *, any_port_when_omitted: bool = False) -> TargetRule:
    """Parse "HOST[:PORTS]" where HOST is an IPv4 address or CIDR, a DNS name (pattern), or a
    bracketed IPv6 address or CIDR ("[fd00:1::/64]:22,443").

    Without PORTS an allow means port 22; a deny (`any_port_when_omitted=True`) means every port,
    because a deny should err wide.
    """
    if not isinstance(text, str):
        raise PolicyError("a target rule must be text such as '10.1.2.3:22'")
    if len(text) > _MAX_RULE_TEXT:
        raise PolicyError("target rule is too long")
    try:
        return _parse_target_rule(text, any_port_when_omitted)
    except TargetError as err:
        raise PolicyError(f"target rule {_quote(text)}: {err}") from None


def _parse_target_rule(text: str, any_port_when_omitted: bool) -> TargetRule:
    if not text:
        raise PolicyError("target rule is empty; expected HOST[:PORTS] such as '10.1.2.3:22'")
    if text.startswith("["):
        host_text, close, rest = text[1:].partition("]")
        if not close:
            raise PolicyError(f"target rule {_quote(text)} is missing ']' after the IPv6 address")
        if rest and not rest.startswith(":"):
            raise PolicyError(f"target rule {_quote(text)}: expected ':PORTS' after ']'")
        port_text = rest[1:] if rest else None
        network, pattern = _network(host_text, bracketed=True), None
    else:
        host_text, colon, port_text_or_empty = text.partition(":")
        if ":" in port_text_or_empty:
            raise PolicyError(f"target rule {_quote(text)}: write IPv6 in brackets, e.g. '[fd00::1]:22'")
        port_text = port_text_or_empty if colon else None
        network, pattern = _host(host_text)
    if port_text is None:
        ports = ALL_PORTS if any_port_when_omitted else SSH_PORT
    elif port_text == "":
        raise PolicyError(f"target rule {_quote(text)} has ':' but no ports; expected N, N-M, a list or '*'")
    else:
        ports = parse_ports(port_text)
    return TargetRule(text=text, network=network, name_pattern=pattern, ports=ports)


def _host(host_text: str) -> tuple[IPNetwork | None, str | None]:
    """Return (network, None) for address and CIDR hosts, (None, pattern) for name hosts."""
    if "/" in host_text:
        return _network(host_text, bracketed=False), None
    if "*" in host_text:
        return None, _name_pattern(host_text)
    host = parse_host(host_text)
    if isinstance(host, str):
        return None, host
    return _single(host), None


def _network(text: str, *, bracketed: bool) -> IPNetwork:
    """Parse an address or CIDR; brackets hold IPv6, bare text IPv4 (any inet_aton form)."""
    address_text, slash, prefix_text = text.partition("/")
    if bracketed and (":" not in address_text):
        raise PolicyError(f"{_quote(text)}: brackets are for IPv6; write IPv4 without them")
    address = parse_host(address_text)
    if isinstance(address, str):
        raise PolicyError(f"{_quote(text)}: a network needs an address, not a name")
    if not slash:
        return _single(address)
    if not _PREFIX.fullmatch(prefix_text):
        raise PolicyError(f"{_quote(text)}: prefix length must be a number such as /24")
    prefix = int(prefix_text)
    if bracketed and isinstance(address, IPv4Address):  # written as ::ffff:a.b.c.d/N
        if prefix < 96:
            raise PolicyError(f"{_quote(text)}: an IPv4-mapped network needs a prefix of at least /96")
        prefix -= 96
    if prefix > address.max_prefixlen:
        raise PolicyError(f"{_quote(text)}: prefix /{prefix} is longer than /{address.max_prefixlen}")
    try:
        network = (IPv4Network if address.version == 4 else IPv6Network)((address, prefix))
    except ValueError:
        raise PolicyError(f"{_quote(text)} has host bits set; expected the network address "
                          f"such as {_strict_hint(address, prefix)}") from None
    return canonical_network(network)


def _single(address: IPAddress) -> IPNetwork:
    if isinstance(address, IPv4Address):
        return IPv4Network((address, 32))
    return IPv6Network((address, 128))


def _strict_hint(address: IPAddress, prefix: int) -> str:
    cls = IPv4Network if address.version == 4 else IPv6Network
    return str(cls((address, prefix), strict=False))


def _name_pattern(text: str) -> str:
    labels = text.rstrip(".").split(".")
    if "*" in labels[-1]:
        raise PolicyError(f"name pattern {_quote(text)} needs a literal last label, e.g. '*.corp.internal'")
    # Checking the pattern with each '*' as a letter reuses every rule for valid host names.
    checked = parse_host(text.replace("*", "a"))
    if not isinstance(checked, str):
        raise PolicyError(f"name pattern {_quote(text)} is not a host name pattern")
    return text.rstrip(".").lower()


def name_matches(pattern: str, name: str) -> bool:
    """Whether `name` matches the name pattern `pattern`, '*' standing for any run of characters
    within one label (see `TargetRule`).

    In linear time, whatever the pattern. A regular expression with '[^.]*' per star backtracks
    through every way of placing the stars: "*a*a*a*a*a*a*a*a*a.corp.test" against a 62-letter
    label took minutes, on the event loop. Here no placement is ever undone:

    * '*' never crosses a dot, so the name must have as many labels as the pattern, and each label
      is matched on its own;
    * within a label the pattern is FIRST*M1*M2*...*LAST: FIRST must start the label and LAST end
      it, and each middle segment is taken at its leftmost place after the previous one
      (`str.find`). Leftmost is never worse than any later place -- it leaves the most room for
      the segments after it -- so if this finds no placement, none exists.

    Each find starts where the previous segment ended, so the finds pass over a label once between
    them: O(len(label) + len(pattern label)) with CPython's find on typical text, and never more
    than O(len(label) * len(longest segment)) (labels are at most 63 characters).
    """
    pattern_labels = pattern.split(".")
    labels = name.split(".")
    return len(pattern_labels) == len(labels) and all(map(_label_matches, pattern_labels, labels))


def _label_matches(pattern: str, label: str) -> bool:
    if "*" not in pattern:
        return pattern == label
    first, *middle, last = pattern.split("*")
    end = len(label) - len(last)
    if end < len(first) or not label.startswith(first) or not label.endswith(last):
        return False
    position = len(first)
    for segment in middle:
        found = label.find(segment, position, end)  # must end before LAST begins
        if found < 0:
            return False
        position = found + len(segment)
    return True


@dataclass(frozen=True, slots=True)
class UserPolicy:
    name: str
    groups: tuple[str, ...] = ()
    allow: tuple[TargetRule, ...] = ()
    deny: tuple[TargetRule, ...] = ()
    expires: datetime | None = None
    keys: tuple[str, ...] | None = None  # None: the file said nothing, keep the stored keys
    listen: tuple[ListenRule, ...] = ()  # remote-forward grants, see ListenRule
    require_totp: bool = False  # a one-time code after the key (#21; policy/totp.py)
    require_security_key: bool = False  # only security keys (sk-*) log in (#21; policy/security_keys.py)
    require_user_verification: bool = False  # ... and their signatures assert a PIN or biometric (#21)


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    name: str
    allow: tuple[TargetRule, ...] = ()
    deny: tuple[TargetRule, ...] = ()
    listen: tuple[ListenRule, ...] = ()
    require_totp: bool = False  # every member needs a one-time code after the key (#21)
    require_security_key: bool = False  # every member logs in with a security key only (#21)
    require_user_verification: bool = False  # ... whose signature asserts a PIN or biometric (#21)


@dataclass(frozen=True, slots=True)
class CertAuthority:
    """A trusted OpenSSH user CA (#21): certificates its keys signed log users in (policy/certificates.py).

    `keys` are OpenSSH public key lines ("ssh-ed25519 AAAA… ca@corp"), checked by the policy file reader.
    `principals_as_groups`: a principal other than the login user that names a group of the policy grants that
    group's rules for the session (`certificates.certificate_groups`; the requests' `extra_groups`). `require_known_user`: the login user must be a user of the policy."""

    name: str
    keys: tuple[str, ...]
    principals_as_groups: bool = False
    require_known_user: bool = True


@dataclass(frozen=True, slots=True)
class RevokedList:
    """The policy's `[revoked]` table (#21): certificates and keys refused even where a CA or the store accepts
    them (policy/revocation.py). `serials`: (CA name, low, high) inclusive; `key_ids`: certificate key ids, of any
    CA; `fingerprints`: "SHA256:…" of keys -- a plain key, a certificate's key, or a CA's key (all it signed)."""

    serials: tuple[tuple[str, int, int], ...] = ()
    key_ids: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.serials or self.key_ids or self.fingerprints)


@dataclass(frozen=True, slots=True)
class Policy:
    """All users, groups and trusted user CAs; an immutable value, swapped whole on reload."""

    users: Mapping[str, UserPolicy] = field(default_factory=dict)
    groups: Mapping[str, GroupPolicy] = field(default_factory=dict)
    cas: Mapping[str, CertAuthority] = field(default_factory=dict)
    revoked: RevokedList = field(default_factory=RevokedList)  # [revoked] (#21)

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", MappingProxyType(dict(self.users)))
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))
        object.__setattr__(self, "cas", MappingProxyType(dict(self.cas)))

    def declared_over(self, current: Policy) -> Policy:
        """This policy as the whole declared state over `current`: its groups and CAs only; its users as defined here,
        and every other user of `current` kept (users are removed only by hand) but with no grants. Keys are
        not policy: the result carries none (the store keeps them)."""
        users = {name: UserPolicy(name=name) for name in current.users}
        users.update({name: dataclasses.replace(user, keys=None) for name, user in self.users.items()})
        return Policy(users, self.groups, self.cas, self.revoked)

    def problems(self) -> list[str]:
        """Inconsistencies worth a warning that do not stop the policy from loading."""
        found = []
        for key, user in self.users.items():
            if user.name != key:
                found.append(f"users entry {_quote(key)} holds user {user.name!r}")
            for group in user.groups:
                if group not in self.groups:
                    found.append(f"user {user.name} names unknown group {_quote(group)}")
        for key, group_policy in self.groups.items():
            if group_policy.name != key:
                found.append(f"groups entry {_quote(key)} holds group {group_policy.name!r}")
        for ca in dict.fromkeys(ca for ca, _, _ in self.revoked.serials):  # (#21) a typo would revoke nothing
            if ca not in self.cas and ca != "home":  # "home": the bastion's own CA (signing.HOME_CA), not declared
                found.append(f"revoked.serials names unknown CA {_quote(ca)}")
        return found

    def expired_entries(self, now: datetime) -> list[str]:
        """Users and grants (allow, listen) whose `expires` has passed, one line each naming the entry: they
        grant nothing any more, which an admin applying or checking the policy most likely did not mean."""
        found = []
        for name, user in self.users.items():
            if user.expires is not None and now >= user.expires:
                found.append(f"user {name} expired at {format_time(user.expires)}")
        for kind, entries in (("users", self.users), ("groups", self.groups)):
            for name, entry in entries.items():
                for rules in ("allow", "listen"):
                    for rule in getattr(entry, rules):
                        if rule.expired(now):
                            found.append(f"{kind}.{name}.{rules}: {rule.text} expired at {format_time(rule.expires)}")
        return found

    def grants_for(self, user: str, extra_groups: tuple[str, ...] = ()) -> list[tuple[str, TargetRule]]:
        """The allow rules that apply to `user`, with origins such as "groups.ops.allow"."""
        return self._rules_for(user, "allow", extra_groups)

    def denials_for(self, user: str, extra_groups: tuple[str, ...] = ()) -> list[tuple[str, TargetRule]]:
        """The deny rules that apply to `user`, with origins such as "users.alice.deny"."""
        return self._rules_for(user, "deny", extra_groups)

    def rules_for(self, user: str, kind: str, extra_groups: tuple[str, ...] = ()) -> list:
        """The user's own rules of `kind` ("allow", "deny", "listen"), then its groups', then those of
        `extra_groups` (a session's groups from its certificate, #21: origin "groups.ops.allow via certificate")
        not already among them, with origins. An unknown user has only the extra groups' rules."""
        return self._rules_for(user, kind, extra_groups)

    def _rules_for(self, user: str, kind: str, extra_groups: tuple[str, ...] = ()) -> list[tuple[str, TargetRule]]:
        user_policy = self.users.get(user)
        if user_policy is None and not extra_groups:
            return []
        rules = [(f"users.{user}.{kind}", rule) for rule in getattr(user_policy, kind)] if user_policy else []
        own = user_policy.groups if user_policy else ()
        for name in own:
            group = self.groups.get(name)
            if group is not None:
                rules += [(f"groups.{name}.{kind}", rule) for rule in getattr(group, kind)]
        for name in dict.fromkeys(extra_groups):
            group = self.groups.get(name)
            if group is not None and name not in own:
                rules += [(f"groups.{name}.{kind} via certificate", rule) for rule in getattr(group, kind)]
        return rules


@dataclass(frozen=True, slots=True)
class AccessRequest:
    user: str
    host: IPAddress | str  # as returned by netguard.parse_host
    addresses: tuple[IPAddress, ...]  # every address the host resolved to
    port: int
    now: datetime  # tz-aware UTC
    extra_groups: tuple[str, ...] = ()  # the session's groups besides the user's own: certificate principals (#21)

    def __post_init__(self) -> None:
        # Comparing a naive time with an aware expiry raises deep inside evaluate(); fail here.
        if self.now.tzinfo is None:
            raise ValueError("AccessRequest.now must be timezone-aware")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # short and safe to show the client
    rule: str | None  # "users.alice.allow: 10.1.2.3:22"; None when no rule decided
    address: IPAddress | None  # where to connect when allowed


# ---- remote forwarding (ssh -R): listen rules and requests ----------------------------------------

LOOPBACK = IPv4Address("127.0.0.1")
ANY_IPV4 = IPv4Address("0.0.0.0")
ANY_IPV6 = IPv6Address("::")


@dataclass(frozen=True, slots=True)
class ListenRule:
    text: str
    bind: IPAddress
    ports: PortSet
    expires: datetime | None = None

    def matches(self, bind: IPAddress, port: int) -> bool:
        """Port 0 ("choose for me") matches any rule for the bind; the port is then picked from its ranges."""
        return bind == self.bind and (port == 0 or port in self.ports)

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


def _bind(text: str, *, empty_means_any: bool) -> IPAddress:
    if text == "":
        return ANY_IPV4 if empty_means_any else LOOPBACK
    if text == "*":
        return ANY_IPV4
    if text.lower() == "localhost":
        return LOOPBACK
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    address = parse_host(inner)
    if isinstance(address, str):
        raise TargetError("bind address must be an IP address, 'localhost', '*' or empty")
    return canonical_address(address)


def parse_bind_address(wire_host: str) -> IPAddress:
    """The address a tcpip-forward request asks to bind; "" means every address (see module docstring)."""
    if len(wire_host) > 255:
        raise TargetError("bind address is too long")
    return _bind(wire_host, empty_means_any=True)


def parse_listen_rule(text: str) -> ListenRule:
    """Parse "BIND:PORTS" from a policy file; an empty BIND means loopback here."""
    if not isinstance(text, str) or not text or len(text) > 1024:
        raise PolicyError("a listen rule must be text such as '127.0.0.1:9000-9099'")
    bind_text, colon, port_text = text.rpartition(":")
    if not colon or not port_text:
        raise PolicyError(f"listen rule {text[:60]!r} needs BIND:PORTS, e.g. '127.0.0.1:9000-9099'")
    if ":" in bind_text and not bind_text.startswith("["):
        raise PolicyError(f"listen rule {text[:60]!r}: write IPv6 in brackets, e.g. '[::1]:9000'")
    try:
        bind = _bind(bind_text, empty_means_any=False)
    except TargetError as err:
        raise PolicyError(f"listen rule {text[:60]!r}: {err}") from None
    return ListenRule(text=text, bind=bind, ports=parse_ports(port_text))


@dataclass(frozen=True, slots=True)
class ListenRequest:
    user: str
    bind: IPAddress
    port: int  # 0: the bastion chooses within the granted ranges
    now: datetime
    extra_groups: tuple[str, ...] = ()  # the session's groups besides the user's own: certificate principals (#21)

    def with_time(self, now: datetime) -> "ListenRequest":
        return replace(self, now=now)

    def with_port(self, port: int) -> "ListenRequest":
        return replace(self, port=port)
