"""The second factor's rules (#21): who needs a one-time code, and whether a code is right, new and in time.

RFC 6238 TOTP (pyotp): 6 digits, 30-second steps, HMAC-SHA1 -- what every authenticator app reads from an
`otpauth://` URI. A code is accepted for its own step and one step either side (clock drift, a code typed as it
turns over), and only once: the store keeps the last step accepted per user, and a code for that step or an
earlier one is refused as used. That also refuses an older code seen after a newer one, as Google's PAM module's
DISALLOW_REUSE does.

Pure: the time (`now`, Unix seconds) and the last accepted step come in as arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

import pyotp

from .model import Policy

STEP_SECONDS = 30
DIGITS = 6
WINDOW = 1  # steps accepted either side of now
PROMPT = "Verification code: "

WRONG = "wrong verification code"
USED = "verification code already used"
_CODE = re.compile(r"[0-9]{6}", re.ASCII)


def totp_required(policy: Policy, user: str) -> bool:
    """Whether `user` must give a one-time code after the key: `require_totp = true` on the user, or on any group
    of the policy the user is in. An unknown user needs none (it has no grants, and a certificate login for a
    user outside the policy follows its CA's settings)."""
    user_policy = policy.users.get(user)
    if user_policy is None:
        return False
    return user_policy.require_totp or any(
        group.require_totp for name in user_policy.groups if (group := policy.groups.get(name)) is not None)


@dataclass(frozen=True, slots=True)
class CodeCheck:
    step: int | None  # the time step the code was for, when it was right and new
    refusal: str | None  # WRONG or USED otherwise

    @property
    def accepted(self) -> bool:
        return self.step is not None


def check_code(secret: str, code: str, now: float, last_step: int | None) -> CodeCheck:
    """Whether `code` is the one-time code of `secret` for the step of `now` or one either side, and newer than
    `last_step` (the last step accepted for this user; None when none yet). Spaces and dashes a user may type
    inside the code are ignored. Every candidate step is compared in constant time."""
    typed = code.replace(" ", "").replace("-", "").strip()
    if not _CODE.fullmatch(typed):
        return CodeCheck(None, WRONG)
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = int(now) // STEP_SECONDS
    matched = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        if pyotp.utils.strings_equal(totp.generate_otp(step), typed) and matched is None:
            matched = step
    if matched is None:
        return CodeCheck(None, WRONG)
    if last_step is not None and matched <= last_step:
        return CodeCheck(None, USED)
    return CodeCheck(matched, None)


def provisioning_uri(secret: str, user: str, public_name: str = "") -> str:
    """The `otpauth://totp/…` URI an authenticator app reads (Key URI Format): issuer "bastion", or "bastion
    NAME" with the config's public_name, so one phone can hold codes for several bastions."""
    issuer = f"bastion {public_name}".strip()
    label = f"{quote(issuer, safe='')}:{quote(user, safe='')}"
    return (f"otpauth://totp/{label}?secret={secret}&issuer={quote(issuer, safe='')}"
            f"&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}")


def valid_secret(secret: str) -> bool:
    """A base32 secret of at least 128 bits, as `user totp enroll` makes (RFC 4226 asks for 128, recommends 160)."""
    return bool(re.fullmatch(r"[A-Z2-7]{26,}", secret))
