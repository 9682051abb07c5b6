"""The bastion's own user CA (#21), for teams without one: what `bastion ca sign` may put in a certificate, and how
the running gateway trusts the home's CA without a policy file naming it.

- Validity: from 5 minutes before now (clock skew) for at most `ca_max_validity` (config, "24h" by default);
  longer is refused, never shortened silently.
- Principals: the user, unless given; each a valid user or group name (a group matters only where the CA has
  principals_as_groups = true).
- Critical options: `source-address` only. Extensions: `permit-port-forwarding` only -- a bastion runs no
  shell, so pty, X11, agent forwarding and user rc would grant nothing but noise.
- Key id: "USER@bastion serial N", so the audit rows (which name the key id and serial) say who and which.
- The home CA is trusted as the CA `home` (require_known_user = true), added to the policy in force by
  `with_home_authority`. A policy file may declare `[cas.home]` itself (the same key, other settings, e.g.
  principals_as_groups = true); then the file's entry is used as written.

Pure: no asyncssh, no clock, no files; time arrives as `now`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from .model import NAME_HINT, CertAuthority, Policy, PolicyError, valid_name
from .netguard import IPNetwork, TargetError, canonical_network

HOME_CA = "home"
EXTENSIONS = ("permit-port-forwarding",)
BACKDATE = timedelta(minutes=5)  # valid from a little before now: the client's clock may be behind
MAX_VALIDITY = timedelta(days=366)  # even a config may not ask for more
_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhdw])", re.ASCII)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_validity(text: str) -> timedelta:
    """'90s', '30m', '8h', '2d', '1w' as a length of time (at most a year)."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise PolicyError(f"validity {str(text)[:20]!r} is not a length of time; expected e.g. 30m, 8h, 2d or 1w")
    length = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if length > MAX_VALIDITY:
        raise PolicyError(f"validity {text} is longer than a year")
    return length


@dataclass(frozen=True, slots=True)
class SigningRequest:
    """One certificate `bastion ca sign` will make, checked: every value as it goes into the certificate."""

    user: str
    serial: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: datetime
    valid_before: datetime
    source_addresses: tuple[IPNetwork, ...] = ()
    extensions: tuple[str, ...] = EXTENSIONS


def signing_request(user: str, serial: int, validity: str, maximum: str, now: datetime,
                    principals: tuple[str, ...] = (), source_addresses: tuple[str, ...] = ()) -> SigningRequest:
    """The checked request, or PolicyError saying which value is wrong and what is allowed."""
    if not valid_name(user):
        raise PolicyError(f"user name {user[:40]!r} is not valid; expected {NAME_HINT}")
    for principal in principals:
        if not valid_name(principal):
            raise PolicyError(f"principal {principal[:40]!r} is not a valid user or group name; expected {NAME_HINT}")
    if not 1 <= serial < 2 ** 64:
        raise PolicyError(f"serial {serial} is outside 1..2^64-1")
    length, limit = parse_validity(validity), parse_validity(maximum)
    if length > limit:
        raise PolicyError(f"--valid {validity} is longer than ca_max_validity ({maximum}, "
                          "config.toml); sign for less, or raise ca_max_validity")
    now = now.replace(microsecond=0)
    networks = []
    for text in source_addresses:
        for item in text.split(","):
            try:
                networks.append(canonical_network(_network(item.strip())))
            except (ValueError, TargetError):
                raise PolicyError(f"--source-address {item.strip()[:60]!r} is not an address or CIDR, e.g. "
                                  "10.0.0.0/8 or 192.0.2.7") from None
    return SigningRequest(
        user=user, serial=serial, key_id=f"{user}@bastion",  # the serial is a field of its own (sshd logs both)
        principals=tuple(dict.fromkeys(principals or (user,))),
        valid_after=now - BACKDATE, valid_before=now + length, source_addresses=tuple(networks),
    )


def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=True)


def home_authority(key_line: str) -> CertAuthority:
    """The home CA as the policy's CA `home`: its certificates log in known users."""
    return CertAuthority(name=HOME_CA, keys=(" ".join(key_line.split()[:2]),), require_known_user=True)


def with_home_authority(policy: Policy, authority: CertAuthority | None) -> Policy:
    """`policy` with the home CA trusted as `home`, unless there is none or the policy declares `home` itself."""
    if authority is None or HOME_CA in policy.cas:
        return policy
    return replace(policy, cas={**policy.cas, HOME_CA: authority})
