"""Security keys at login (#21): which key types a user may log in with, and what each signature asserted.

1. `validate_public_key` / `examine_certificate` (connection.py) ask `security_key_type_refusal(key)`: with
   `require_security_key` or `require_user_verification` in the policy, a key (or certified key) that is not a
   security key is refused with a one-line reason, logged, audited, and counted toward max_auth_tries.
2. The client signs. transport/security_keys.py verifies the signature and calls `security_key_signed` with its
   flags and counter: user presence unless the key's `no-touch-required` (or the certificate's extension) waives
   it, user verification where the key's `verify-required` or the policy asks for it (policy/security_keys.py).
   A refusal ("user presence not asserted …") is logged, audited with the flags seen, and counts toward
   max_auth_tries; an accepted signature's flags go into the login's audit row (`security_key_note`).
3. `_begin_session` (connection.py) checks again against the policy as it is then (`security_key_session_refusal`).
"""

from __future__ import annotations

from typing import Any

import asyncssh

from .. import transport
from ..policy.certificates import describe_certificate
from ..policy.model import Policy
from ..policy.security_keys import (
    describe_signature,
    is_security_key,
    key_type_refusal,
    security_key_rules,
    signature_refusal,
    signature_requirements,
)

UNCHECKABLE = "user verification is required but this server cannot see security-key flags (asyncssh hook missing)"


def key_type(key: asyncssh.SSHKey) -> str:
    algorithm = key.get_algorithm()
    return algorithm.decode("ascii", "replace") if isinstance(algorithm, bytes) else str(algorithm)


class SecurityKeys:
    """The security-key half of a login for a GatewayConnection (which provides user, log, auth_log, key_options,
    _login_policy and _publickey_refused)."""

    _security_key_flags: int | None = None  # of the signature that proved the key, once verified
    _security_key_note = ""

    user: str
    log: Any
    auth_log: Any
    key_options: Any
    _login_policy: Policy | None
    _publickey_refused: Any  # (fingerprint, reason, certificate) -> None: log, audit, count toward max_auth_tries

    def security_key_type_refusal(self, key: asyncssh.SSHKey) -> str | None:
        """Why this key (or certified key) may not log the user in, by its type; None if it may. Called while the
        key is only offered: forgets what an earlier key's signature asserted."""
        self._security_key_flags, self._security_key_note = None, ""
        assert self._login_policy is not None
        rules = security_key_rules(self._login_policy, self.user)
        refusal = key_type_refusal(rules, key_type(key))
        if refusal is None and rules.user_verification and not transport.security_key_flags_supported():
            return UNCHECKABLE
        return refusal

    def security_key_signed(self, username: str, key: asyncssh.SSHKey, flags: int, counter: int) -> bool:
        """Return True if a verified signature with these flags may log the user in (transport/security_keys.py
        calls this for the key validate_public_key or examine_certificate has just accepted)."""
        assert self._login_policy is not None
        requirements = signature_requirements(security_key_rules(self._login_policy, self.user), self.key_options)
        seen = describe_signature(flags, counter)
        refusal = signature_refusal(flags, requirements)
        if refusal is None:
            self._security_key_flags, self._security_key_note = flags, seen
            return True
        reason = f"{refusal} ({seen})"
        certificate = getattr(self, "certificate", None)
        if certificate is not None:  # named like every other certificate refusal
            reason = f"certificate refused: {reason}: {describe_certificate(certificate)}"
        self.auth_log.failed_publickey(key, certificate)
        self._publickey_refused(key.get_fingerprint("sha256"), reason, certificate)
        return False

    def security_key_note(self) -> str:
        """" (security key: user presence, counter 7)" for the login's audit row; "" for other keys."""
        return f" ({self._security_key_note})" if self._security_key_note else ""

    def security_key_session_refusal(self, policy: Policy, key_type_name: str) -> str | None:
        """Why the session may not begin under `policy` as it is now, for a login by a key of `key_type_name`."""
        rules = security_key_rules(policy, self.user)
        refusal = key_type_refusal(rules, key_type_name)
        if refusal is None and is_security_key(key_type_name):
            if self._security_key_flags is None:
                return UNCHECKABLE if rules.user_verification else None
            refusal = signature_refusal(self._security_key_flags, signature_requirements(rules, self.key_options))
        return refusal
