"""Who may listen where (ssh -R): listen rules, the bind address on the wire, and the pure decision.

A listen rule is "BIND:PORTS". BIND is "" or "localhost" (loopback, 127.0.0.1), "*" or "0.0.0.0"
(every IPv4 address), "[::]" (every IPv6 address), or one address of the bastion. PORTS is N, N-M, a
comma list or '*'. A wildcard bind is granted only by a rule for that wildcard: a loopback grant never
opens a port to the network.

On the wire (tcpip-forward), OpenSSH sends "localhost" for `-R 9000:…` and "" for `-R :9000:…` or
`-R *:9000:…`; "" means every address there, as with sshd's GatewayPorts=clientspecified.

Pure: no I/O, time comes in on the request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address

from .netguard import IPAddress, TargetError, canonical_address, parse_host
from .policy import ASK_ACCESS, ASK_GRANT, ASK_RENEWAL, Decision, Policy, PolicyError, PortSet, parse_ports

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

    def with_time(self, now: datetime) -> "ListenRequest":
        return replace(self, now=now)

    def with_port(self, port: int) -> "ListenRequest":
        return replace(self, port=port)


def _listen_rules(policy: Policy, user: str, now: datetime) -> list[tuple[str, ListenRule]]:
    return [(origin, rule) for origin, rule in policy.rules_for(user, "listen") if not rule.expired(now)]


def evaluate_listen(policy: Policy, request: ListenRequest) -> Decision:
    """Deny unless an unexpired listen rule of the user or its groups grants this bind and port."""
    user = policy.users.get(request.user)
    if user is None:
        return Decision(False, f"unknown user{ASK_ACCESS}", None, None)
    if user.expires is not None and request.now >= user.expires:
        return Decision(False, f"access for {user.name} expired{ASK_RENEWAL}", None, None)
    if not 0 <= request.port <= 65535:
        return Decision(False, "port must be 0..65535", None, None)
    for origin, rule in _listen_rules(policy, request.user, request.now):
        if rule.matches(request.bind, request.port):
            return Decision(True, "granted", f"{origin}: {rule.text}", request.bind)
    where = f"[{request.bind}]" if request.bind.version == 6 else str(request.bind)
    port = "a port of its choosing" if request.port == 0 else str(request.port)
    return Decision(False, f"{request.user} may not listen on {where}:{port}{ASK_GRANT}", None, None)


def listen_ranges(policy: Policy, user: str, bind: IPAddress, now: datetime) -> list[tuple[int, int]]:
    """The port ranges granted to `user` on `bind` now (for port 0)."""
    ranges: list[tuple[int, int]] = []
    for _, rule in _listen_rules(policy, user, now):
        if rule.bind == bind:
            ranges.extend(r for r in rule.ports.ranges if r not in ranges)
    return ranges
