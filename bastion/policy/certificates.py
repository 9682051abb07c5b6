"""OpenSSH user certificates (#21): whether a certificate may log a user in, and what it narrows.

The gateway reads the certificate's fields (asyncssh decodes it and checks the CA's signature) and passes them here
as plain values in a `Certificate`; `certificate_refusal` says why it may not log in, or None. The checks, in order:

1. a CA of the policy (`[cas.NAME]`) signed it, matched by the SHA-256 fingerprint of the CA key;
2. it is a user certificate, not a host certificate;
3. it is inside its validity window (valid_after <= now < valid_before);
4. it names principals, and one of them is the login user (OpenSSH refuses a user certificate without principals
   under TrustedUserCAKeys; so do we);
5. critical options: `source-address` is enforced; `force-command` refuses the login (a bastion runs no commands),
   and so does any other critical option, since a critical option we do not enforce must not be ignored;
6. the CA's `require_known_user`: the login user must be a user of the policy, and not expired.

Extensions narrow the session instead (`certificate_key_options`): without `permit-port-forwarding` it may open no
tunnels and no listeners, the same narrowing as an authorized_keys line's `no-port-forwarding`.

Pure: no asyncssh, no clock; time arrives as `now`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .authorized_keys import KeyOptions
from .model import CertAuthority, Policy, format_time
from .netguard import IPAddress, IPNetwork, canonical_address

_FOREVER = 253402300799  # 9999-12-31T23:59:59Z; ssh-keygen's "forever" is 2**64-1
_MAX_SHOWN = 60


@dataclass(frozen=True, slots=True)
class Certificate:
    """What the gateway read from an OpenSSH certificate, as plain values."""

    key_id: str
    serial: int
    user_certificate: bool  # False: a host certificate
    principals: tuple[str, ...]
    valid_after: int  # seconds since the epoch, as in the certificate
    valid_before: int
    ca_fingerprint: str  # "SHA256:…" of the signing (CA) key
    critical_options: tuple[str, ...] = ()  # their names, e.g. ("source-address",)
    source_addresses: tuple[IPNetwork, ...] = ()  # the source-address option's networks
    extensions: frozenset[str] = field(default_factory=frozenset)  # e.g. {"permit-port-forwarding", "permit-pty"}


def key_fingerprint(line: str) -> str | None:
    """'SHA256:…' of an OpenSSH public key line, as `ssh-keygen -l` prints it; None if the line has no base64 key."""
    parts = line.split()
    if len(parts) < 2:
        return None
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def trusted_authority(policy: Policy, ca_fingerprint: str) -> CertAuthority | None:
    """The policy's CA one of whose keys has this fingerprint, or None."""
    for authority in policy.cas.values():
        if any(key_fingerprint(line) == ca_fingerprint for line in authority.keys):
            return authority
    return None


def describe_certificate(cert: Certificate) -> str:
    """How audit rows and log lines name a certificate: 'key id alice@corp serial 7 CA SHA256:…'."""
    return f"key id {_shown(cert.key_id)} serial {cert.serial} CA {cert.ca_fingerprint}"


def certificate_refusal(policy: Policy, cert: Certificate, user: str, address: IPAddress,
                        now: datetime) -> str | None:
    """Why `cert` may not log `user` in from `address` at `now` (see the module docstring), or None."""
    authority = trusted_authority(policy, cert.ca_fingerprint)
    if authority is None:
        return "certificate signed by an untrusted CA"
    if not cert.user_certificate:
        return "a host certificate is not a user certificate"
    moment = now.timestamp()
    if moment < cert.valid_after:
        return f"certificate not yet valid (valid from {_time(cert.valid_after)})"
    if moment >= cert.valid_before:
        return f"certificate expired at {_time(cert.valid_before)}"
    if not cert.principals:
        return "certificate names no principals"
    if user not in cert.principals:
        return f"certificate is not valid for user {_shown(user)} (principals: {_shown(', '.join(cert.principals))})"
    for name in cert.critical_options:
        if name == "force-command":
            return "certificate has force-command; a bastion runs no commands"
        if name != "source-address":
            return f"certificate has unsupported critical option {_shown(name)}"
    if cert.source_addresses:
        address = canonical_address(address)
        if not any(network.version == address.version and address in network for network in cert.source_addresses):
            networks = ",".join(str(network) for network in cert.source_addresses)
            return f"certificate not valid from {address} (source-address {_shown(networks)})"
    return known_user_refusal(policy, authority, user, now)


def known_user_refusal(policy: Policy, authority: CertAuthority, user: str, now: datetime) -> str | None:
    """Why `user` may not log in (or stay logged in) with a certificate of `authority`: unknown where the CA
    requires known users, or expired. None if they may."""
    user_policy = policy.users.get(user)
    if user_policy is None:
        return f"unknown user {_shown(user)} (CA {authority.name} requires a known user)" \
            if authority.require_known_user else None
    if user_policy.expires is not None and now >= user_policy.expires:
        return f"access expired at {format_time(user_policy.expires)}"
    return None


def certificate_session_refusal(policy: Policy, ca_fingerprint: str, user: str, now: datetime) -> str | None:
    """Why a live session that logged in with a certificate of this CA may no longer continue, or None: the CA
    is no longer trusted, or the user is gone (where required) or expired. The certificate's own end does not end
    a session, as in OpenSSH."""
    authority = trusted_authority(policy, ca_fingerprint)
    if authority is None:
        return "certificate authority no longer trusted"
    reason = known_user_refusal(policy, authority, user, now)
    if reason is not None and reason.startswith("unknown user"):
        return "user removed"
    return reason


def certificate_key_options(cert: Certificate) -> KeyOptions:
    """The session's narrowing from the certificate's extensions: no tunnels without permit-port-forwarding."""
    return KeyOptions(port_forwarding="permit-port-forwarding" in cert.extensions)


def _time(seconds: int) -> str:
    if seconds >= _FOREVER:
        return "forever"
    return format_time(datetime.fromtimestamp(max(seconds, 0), timezone.utc))


def _shown(text: str) -> str:
    """Certificate text is the client's: printable and short in our rows and lines."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."
