"""Show the gateway each OpenSSH user certificate a client offers, before asyncssh checks it (#21).

asyncssh 2.24.1 calls `SSHServer.validate_ca_key(username, ca_key)` with the CA key only: the certificate's key id,
serial, options and extensions never reach the server object, and a certificate that asyncssh then finds expired, of
the wrong type or for another principal is refused without a word to it -- nothing to audit. This wraps
`SSHServerConnection._validate_openssh_certificate(username, cert)`, called once asyncssh has decoded the certificate
and checked the CA's signature on it: when the connection's owner has `examine_certificate(username, fields, key)
-> bool`, it sees the certificate first -- its fields as plain values (`policy.certificates.Certificate`, read here
from asyncssh's private attributes, so the gateway never touches them) and the certified key -- and False refuses
it. asyncssh's own checks (type, principal, validity, source-address) still run after an accept.

If a later asyncssh lacks the method, nothing is patched and certificates are refused: the gateway's
`validate_ca_key` accepts only a CA that `examine_certificate` has just accepted (fails closed).
A certificate asyncssh cannot decode (an unknown critical option, a bad CA signature, a key id that is not UTF-8)
is refused before that point; `_validate_client_certificate` is wrapped too, so that when it refuses a blob whose
algorithm names an OpenSSH certificate, the owner's `certificate_unreadable(username, key_data, problem)` hears of it
(decoding again, for asyncssh's words, only on that failure path).
"""

from __future__ import annotations

import functools
from typing import Any

from asyncssh.connection import SSHServerConnection
from asyncssh.public_key import CERT_TYPE_USER, KeyImportError, decode_ssh_certificate

from ..policy.certificates import Certificate

_PATCHED = "_bastion_examines_certificates"
_CRITICAL = ("force-command", "source-address", "verify-required")  # the critical options asyncssh decodes (the
# last once security_keys.py has taught it, #21); it refuses any other


def certificate_fields(cert: Any) -> Certificate:
    """An asyncssh SSHOpenSSHCertificate's fields as plain values."""
    options = dict(cert.options)
    return Certificate(
        key_id=str(cert._key_id),
        serial=int(cert._serial),
        user_certificate=cert._cert_type == CERT_TYPE_USER,
        principals=tuple(str(p) for p in cert.principals),
        valid_after=int(cert._valid_after),
        valid_before=int(cert._valid_before),
        ca_fingerprint=cert.signing_key.get_fingerprint("sha256"),
        critical_options=tuple(name for name in _CRITICAL if name in options),
        source_addresses=tuple(options.get("source-address") or ()),
        extensions=frozenset(name for name, value in options.items() if name not in _CRITICAL and value is True),
        ca_key=bytes(cert.signing_key.public_data),
    )


def _certificate_algorithm(key_data: bytes) -> str | None:
    """The algorithm name a public key blob starts with, if it names an OpenSSH certificate."""
    length = int.from_bytes(key_data[:4], "big")
    name = key_data[4:4 + min(length, 128)].decode("ascii", "replace")
    return name if name.endswith("-cert-v01@openssh.com") else None


def apply() -> bool:
    """Wrap the certificate checks (idempotent). Returns whether the hook is in place."""
    original = getattr(SSHServerConnection, "_validate_openssh_certificate", None)
    client_original = getattr(SSHServerConnection, "_validate_client_certificate", None)
    if original is None or client_original is None:
        return False
    if getattr(original, _PATCHED, False):
        return True

    @functools.wraps(client_original)
    async def validate_client_certificate(self: SSHServerConnection, username: str, key_data: bytes) -> Any:
        key = await client_original(self, username, key_data)
        if key is None:
            algorithm = _certificate_algorithm(key_data)
            unreadable = getattr(self._owner, "certificate_unreadable", None)
            if algorithm is not None and unreadable is not None:
                try:
                    decode_ssh_certificate(key_data)
                except KeyImportError as exc:
                    unreadable(username, key_data, str(exc))
        return key

    @functools.wraps(original)
    async def validate_openssh_certificate(self: SSHServerConnection, username: str, cert: Any) -> Any:
        examine = getattr(self._owner, "examine_certificate", None)
        if examine is not None and not examine(username, certificate_fields(cert), cert.key):
            return None
        return await original(self, username, cert)

    setattr(validate_openssh_certificate, _PATCHED, True)
    SSHServerConnection._validate_openssh_certificate = validate_openssh_certificate  # type: ignore[method-assign]
    SSHServerConnection._validate_client_certificate = validate_client_certificate  # type: ignore[method-assign]
    return True
