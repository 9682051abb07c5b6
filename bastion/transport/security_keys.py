"""Show the gateway the flags of each security-key signature a client logs in with (#21).

A security key (`sk-ssh-ed25519@openssh.com`, `sk-ecdsa-sha2-nistp256@openssh.com`, and certificates of them) signs
`SHA256(application) || flags || counter || SHA256(data)` (OpenSSH's PROTOCOL.u2f); the signature on the wire is
`string sig-algorithm, string signature, byte flags, uint32 counter` (a webauthn signature adds three strings). The
flags say whether the user touched the key (0x01, user presence) and gave a PIN or biometric (0x04, verification).

asyncssh 2.24.1 checks one thing of them, server side: `verify_ssh` of sk_eddsa.py / sk_ecdsa.py refuses a signature
without user presence when the key's `_touch_required` is set, which `_validate_client_public_key` sets unless the
authorized_keys option `no-touch-required` is present (for a certificate: unless both that option and the
certificate's `no-touch-required` extension are; without authorized_client_keys, as here, the option never is, so
touch is always required). User verification is never checked (asyncssh does not know `verify-required`), the flags
and counter never reach the server object, and a signature refused for want of a touch fails like a bad one: nothing
to audit.

This wraps `SSHServerConnection.validate_public_key(username, key_data, msg, signature)`, the call that checks the
signed request. When the owner has `security_key_signed(username, key, flags, counter) -> bool` and the key (or
certified key) is a security key, the wrapper

1. asks asyncssh whether the key would be accepted: the same method without `msg` (its documented query form; the
   owner's validate_public_key / examine_certificate run as usual);
2. verifies the signature itself, exactly as asyncssh does (`key.verify(String(session_id) + msg, signature)`), but
   with touch not required, after checking its algorithm against the server's signature_algs as algorithms.py
   does, since the query form skips that check;
3. hands the owner the flags and counter of that verified signature: the owner decides presence and verification
   (policy/security_keys.py), audits, and returns False to refuse.

Flags are part of the signed data, so flags a client altered after signing fail step 2.

asyncssh 2.24.1 also refuses to decode a user certificate with the critical option `verify-required` (OpenSSH's way
for a CA to demand user verification; `ssh-keygen -s … -O verify-required`): its decoder table lacks it. Once the
signature hook is in place, `apply` adds it to `SSHOpenSSHCertificateV01._user_option_decoders` (a flag without a
value, as `_decode_bool` reads it), so such a certificate reaches the gateway, whose certificate rules require
verification for it (certificates.py lists it among the critical options it hands over). Without the hook it is not
added, and asyncssh goes on refusing such certificates. Any other key, a query
without a signature, or an owner without the callback: asyncssh's own method, unchanged.
If a later asyncssh lacks the method, nothing is patched and `installed()` is False: the gateway then refuses users
whose policy needs user verification (fails closed; asyncssh still requires touch by itself).
"""

from __future__ import annotations

import functools
from typing import Any

from asyncssh.connection import SSHServerConnection
from asyncssh.packet import PacketDecodeError, SSHPacket, String
from asyncssh.public_key import (
    KeyImportError,
    SSHOpenSSHCertificate,
    SSHOpenSSHCertificateV01,
    decode_ssh_certificate,
    decode_ssh_public_key,
)

_PATCHED = "_bastion_security_key_flags"
SECURITY_KEY_ALGORITHMS = frozenset({
    b"sk-ssh-ed25519@openssh.com", b"sk-ecdsa-sha2-nistp256@openssh.com",
    b"sk-ssh-ed25519-cert-v01@openssh.com", b"sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
})


def key_algorithm(key_data: bytes) -> bytes:
    """The algorithm name a public key or certificate blob starts with (b"" when it is not readable)."""
    try:
        return SSHPacket(key_data).get_string()[:128]
    except PacketDecodeError:
        return b""


def signature_fields(signature: bytes) -> tuple[bytes, int, int] | None:
    """(signature algorithm, flags, counter) of a security key's SSH signature; None when it is not one."""
    try:
        packet = SSHPacket(signature)
        algorithm = packet.get_string()
        packet.get_string()  # the signature proper
        return algorithm, packet.get_byte(), packet.get_uint32()
    except PacketDecodeError:
        return None


def _signing_key(key_data: bytes) -> Any:
    """The key that made the signature: the key itself, or the key a certificate certifies."""
    if key_algorithm(key_data).endswith(b"-cert-v01@openssh.com"):
        return decode_ssh_certificate(key_data).key
    return decode_ssh_public_key(key_data)


def apply() -> bool:
    """Wrap validate_public_key once (idempotent). Returns whether the hook is in place."""
    original = getattr(SSHServerConnection, "validate_public_key", None)
    if original is None:
        return False
    if getattr(original, _PATCHED, False):
        return True

    @functools.wraps(original)
    async def validate_public_key(self: SSHServerConnection, username: str, key_data: bytes, msg: bytes,
                                  signature: bytes) -> bool:
        signed = getattr(self._owner, "security_key_signed", None)
        if not msg or signed is None or key_algorithm(key_data) not in SECURITY_KEY_ALGORITHMS:
            return await original(self, username, key_data, msg, signature)
        fields = signature_fields(signature)
        if fields is None or fields[0] not in self._sig_algs:
            return False
        if not await original(self, username, key_data, b"", b""):  # 1. would the key (or certificate) do?
            return False
        try:
            key = _signing_key(key_data)
        except (KeyImportError, PacketDecodeError, ValueError):
            return False
        key.set_touch_required(False)  # 2. the owner judges presence (and verification) from the flags
        if not key.verify(String(self._session_id) + msg, signature):
            return False
        _, flags, counter = fields
        return bool(signed(username, key, flags, counter))  # 3.

    setattr(validate_public_key, _PATCHED, True)
    SSHServerConnection.validate_public_key = validate_public_key  # type: ignore[method-assign]
    _decode_verify_required()
    return True


def _decode_verify_required() -> None:
    """Let asyncssh decode the critical option verify-required (a flag; see the module docstring)."""
    decoders = getattr(SSHOpenSSHCertificateV01, "_user_option_decoders", None)
    flag = getattr(SSHOpenSSHCertificate, "_decode_bool", None)
    if isinstance(decoders, dict) and flag is not None:
        decoders.setdefault(b"verify-required", flag)


def installed() -> bool:
    """Whether the hook is in place in this process."""
    return bool(getattr(getattr(SSHServerConnection, "validate_public_key", None), _PATCHED, False))
