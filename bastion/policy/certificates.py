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
   `verify-required` is enforced: the certified security key's signatures must assert user verification
   (policy/security_keys.py);
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
    ca_key: bytes = b""  # the CA's public key blob (#21: revocation of a CA by key or hash); b"" if not known


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
        if name not in ("source-address", "verify-required"):  # verify-required: policy/security_keys.py (#21)
            return f"certificate has unsupported critical option {_shown(name)}"
    if cert.source_addresses:
        address = canonical_address(address)
        if not any(network.version == address.version and address in network for network in cert.source_addresses):
            networks = ",".join(str(network) for network in cert.source_addresses)
            return f"certificate not valid from {address} (source-address {_shown(networks)})"
    return known_user_refusal(policy, authority, user, now)


def certificate_groups(policy: Policy, cert: Certificate, user: str) -> tuple[str, ...]:
    """The groups whose rules a session that logged in as `user` with `cert` has besides the user's own: where the
    CA that signed it says principals_as_groups = true, each principal other than the login user that names a
    group of the policy (#21). The login user must still be a principal (certificate_refusal): a certificate for
    a group alone logs nobody in. Computed from the policy in force, so a change to the CA or groups counts."""
    authority = trusted_authority(policy, cert.ca_fingerprint)
    if authority is None or not authority.principals_as_groups:
        return ()
    return tuple(dict.fromkeys(name for name in cert.principals if name != user and name in policy.groups))


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


# The fields of each certificate type's key, between the nonce and the serial (OpenSSH's PROTOCOL.certkeys);
# an mpint is a length-prefixed string too.
_KEY_FIELDS = {
    "ssh-rsa": 2, "ssh-dss": 4, "ecdsa-sha2-nistp256": 2, "ecdsa-sha2-nistp384": 2, "ecdsa-sha2-nistp521": 2,
    "ssh-ed25519": 1, "sk-ecdsa-sha2-nistp256@openssh.com": 3, "sk-ssh-ed25519@openssh.com": 2,
}
_KNOWN_CRITICAL = ("force-command", "source-address", "verify-required")


class _Reader:
    def __init__(self, blob: bytes):
        self.blob, self.offset = blob, 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.blob):
            raise ValueError("truncated")
        chunk = self.blob[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def string(self) -> bytes:
        return self.take(self.uint(4))


def _names(data: bytes) -> tuple[str, ...]:
    """The names of a critical options or extensions field: (string name, string data) pairs."""
    reader, names = _Reader(data), []
    while reader.offset < len(data):
        names.append(reader.string().decode("utf-8", "replace"))
        reader.string()
    return tuple(names)


def read_certificate_blob(blob: bytes) -> Certificate | None:
    """An OpenSSH certificate's fields as it claims them, read without checking its CA's signature, or None if it
    is not one we can read. Only for naming a certificate asyncssh refused to decode (an unknown critical option,
    a bad signature) in the audit row: nothing read here is trusted."""
    try:
        reader = _Reader(blob)
        algorithm = reader.string().decode("ascii")
        key_type = algorithm.removesuffix("-cert-v01@openssh.com")
        if key_type == algorithm or key_type not in _KEY_FIELDS:
            return None
        reader.string()  # nonce
        for _ in range(_KEY_FIELDS[key_type]):
            reader.string()
        serial, cert_type = reader.uint(8), reader.uint(4)
        key_id = reader.string().decode("utf-8", "replace")
        principals = []
        principal_reader = _Reader(reader.string())
        while principal_reader.offset < len(principal_reader.blob):
            principals.append(principal_reader.string().decode("utf-8", "replace"))
        valid_after, valid_before = reader.uint(8), reader.uint(8)
        critical, extensions = _names(reader.string()), _names(reader.string())
        reader.string()  # reserved
        ca_key = reader.string()
    except (ValueError, UnicodeDecodeError):
        return None
    return Certificate(
        key_id=key_id, serial=serial, user_certificate=cert_type == 1, principals=tuple(principals),
        valid_after=valid_after, valid_before=valid_before,
        ca_fingerprint="SHA256:" + base64.b64encode(hashlib.sha256(ca_key).digest()).decode().rstrip("="),
        critical_options=critical, extensions=frozenset(extensions), ca_key=ca_key,
    )


def unreadable_refusal(blob: bytes, problem: str) -> str:
    """The audited reason for a certificate asyncssh refused to decode (`problem`: its words). Named by the fields
    it claims, marked unverified; an unknown critical option is named."""
    cert = read_certificate_blob(blob)
    if cert is None:
        return f"certificate refused: unreadable certificate ({_shown(problem)})"
    unknown = [name for name in cert.critical_options if name not in _KNOWN_CRITICAL]
    why = f"certificate has unsupported critical option {_shown(unknown[0])}" if unknown else \
        f"unreadable certificate ({_shown(problem)})"
    return f"certificate refused: {why}: {describe_certificate(cert)} (as it claims, not verified)"


def certificate_key_options(cert: Certificate) -> KeyOptions:
    """The session's narrowing from the certificate's extensions: no tunnels without permit-port-forwarding; a
    security key's touch waived by no-touch-required (#21, policy/security_keys.py; sshd honours it too)."""
    return KeyOptions(port_forwarding="permit-port-forwarding" in cert.extensions,
                      touch_required="no-touch-required" not in cert.extensions,
                      verify_required="verify-required" in cert.critical_options)


def _time(seconds: int) -> str:
    if seconds >= _FOREVER:
        return "forever"
    return format_time(datetime.fromtimestamp(max(seconds, 0), timezone.utc))


def _shown(text: str) -> str:
    """Certificate text is the client's: printable and short in our rows and lines."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."
