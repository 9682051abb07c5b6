"""Security keys (#21): FIDO/U2F keys made by `ssh-keygen -t ed25519-sk` or `-t ecdsa-sk`, and certificates of them.

A security key signs `SHA256(application) || flags || counter || SHA256(message)` (OpenSSH's PROTOCOL.u2f), and the
flags byte says what the authenticator checked: bit 0x01 user presence (the key was touched), bit 0x04 user
verification (a PIN or biometric). The gateway hands the flags of a signature it has verified to the rules here:

- user presence is required by default; a key's authorized_keys option `no-touch-required`, or the extension
  `no-touch-required` of a certificate signed by a trusted CA, waives it for that key (as sshd does);
- user verification is required by the key's option `verify-required`, and for every login of a user with
  `require_user_verification = true` (on the user or on one of its groups);
- `require_security_key = true` (user or group): keys of any other type are refused for the user. So are they with
  `require_user_verification = true`: only a security key can assert a verified user. (sshd's PubkeyAuthOptions
  verify-required leaves other key types alone; a policy that asks for a PIN here means it for every login.)

Pure: no asyncssh, no clock. Key types are the SSH algorithm names ("sk-ssh-ed25519@openssh.com").
"""

from __future__ import annotations

from dataclasses import dataclass

from .authorized_keys import KeyOptions
from .model import Policy

USER_PRESENCE = 0x01  # SSH_SK_USER_PRESENCE_REQD: the authenticator was touched
USER_VERIFICATION = 0x04  # SSH_SK_USER_VERIFICATION_REQD: the user was verified (PIN, biometric)
SECURITY_KEY_TYPES = frozenset({"sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"})
SECURITY_KEY_HINT = "ssh-keygen -t ed25519-sk"

PRESENCE_MISSING = "user presence not asserted (the security key was not touched)"
VERIFICATION_MISSING = "user verification not asserted (no PIN or biometric)"


def is_security_key(key_type: str) -> bool:
    """Whether `key_type` (a key's algorithm, or its certificate's) is a security key type."""
    return key_type.replace("-cert-v01@openssh.com", "@openssh.com") in SECURITY_KEY_TYPES


@dataclass(frozen=True, slots=True)
class SecurityKeyRules:
    """What the policy asks of a user's logins (the user's own settings or any of its groups')."""

    security_key: bool = False  # require_security_key
    user_verification: bool = False  # require_user_verification

    @property
    def only_security_keys(self) -> bool:
        return self.security_key or self.user_verification


def security_key_rules(policy: Policy, user: str) -> SecurityKeyRules:
    """The rules for `user`: set on the user, or on any group of the policy it is in. An unknown user has none."""
    user_policy = policy.users.get(user)
    if user_policy is None:
        return SecurityKeyRules()
    groups = [group for name in user_policy.groups if (group := policy.groups.get(name)) is not None]
    return SecurityKeyRules(
        security_key=user_policy.require_security_key or any(g.require_security_key for g in groups),
        user_verification=user_policy.require_user_verification or any(g.require_user_verification for g in groups),
    )


def key_type_refusal(rules: SecurityKeyRules, key_type: str) -> str | None:
    """Why a key of `key_type` may not log this user in at all, or None. One line, for the audit row and the log."""
    if not rules.only_security_keys or is_security_key(key_type):
        return None
    shown = "".join(c if c.isprintable() else "?" for c in key_type[:60])
    setting = "require_user_verification" if rules.user_verification and not rules.security_key \
        else "require_security_key"
    return f"a security key is required ({setting}); {shown} keys are refused, use one made by {SECURITY_KEY_HINT}"


@dataclass(frozen=True, slots=True)
class SignatureRequirements:
    """What one signature of a security key must assert."""

    user_presence: bool = True
    user_verification: bool = False


def signature_requirements(rules: SecurityKeyRules, options: KeyOptions) -> SignatureRequirements:
    """What a signature by the key that logs in must assert: its options (`no-touch-required`, `verify-required`;
    for a certificate, from its extensions) and the user's rules."""
    return SignatureRequirements(user_presence=options.touch_required,
                                 user_verification=options.verify_required or rules.user_verification)


def signature_refusal(flags: int, requirements: SignatureRequirements) -> str | None:
    """Why a verified security-key signature with these `flags` may not log in, or None."""
    if requirements.user_presence and not flags & USER_PRESENCE:
        return PRESENCE_MISSING
    if requirements.user_verification and not flags & USER_VERIFICATION:
        return VERIFICATION_MISSING
    return None


def describe_signature(flags: int, counter: int) -> str:
    """The flags and counter of a signature for the audit row: "security key: user presence, user verification,
    counter 7"."""
    seen = [name for bit, name in ((USER_PRESENCE, "user presence"), (USER_VERIFICATION, "user verification"))
            if flags & bit]
    return f"security key: {', '.join(seen) or 'neither user presence nor user verification'}, counter {counter}"
