"""The second factor at login (#21): after the key (or certificate), a one-time code, the way sshd's
`AuthenticationMethods publickey,keyboard-interactive` asks for it.

1. `begin_auth` (connection.py) calls `second_factor_begin`: does the policy want a code from this user
   (policy/totp.py `totp_required`), and the user's secret from the store.
2. The client proves its key. transport/partial_auth.py asks `more_auth_required("publickey")`: for such a user the
   answer is yes, so the client hears "partial success"; from then on only keyboard-interactive is offered.
3. `get_kbdint_challenge` prompts "Verification code: " (echo off); `validate_kbdint_response` checks the code
   (right, in its ±1 step window, not used before: the store marks its step used in one statement).
4. `_begin_session` (connection.py) refuses a session that needed a code and has none (`second_factor_refusal`):
   the fail-closed check for an asyncssh without the partial-success hook, or a policy changed during the login.

A wrong or replayed code counts toward max_auth_tries like a refused key, and a connection that never logs in counts
against its source's penalty (connection_lost). Every outcome is logged and audited with the method
"publickey+totp"; the secret and the codes never are.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..clock import utc_now
from ..policy.model import Policy
from ..policy.totp import PROMPT, USED, check_code, totp_required
from .. import transport

# A person reads the code off a phone and types it: once the key is proved they get sshd's LoginGraceTime (120 s),
# however short login_grace_seconds is set against anonymous clients holding connections open.
CODE_ENTRY_SECONDS = 120.0

METHOD = "publickey+totp"  # the audit rows' method for every TOTP outcome
NOT_ENROLLED = "verification code required but none enrolled"


class SecondFactor:
    """The keyboard-interactive half of a login for a GatewayConnection (which provides ctx, user, log, auth_log,
    client_ip, client_port, key_fingerprint, failed_auths, count_failure, disconnect and _refuse_unaudited)."""

    _totp_needed = False
    _totp_secret: tuple[str, int | None] | None = None
    _key_proven = False  # the client has proved a key: only the code is left
    totp_verified = False

    ctx: Any
    log: Any
    auth_log: Any
    conn: Any
    user: str
    client_ip: str
    client_port: int
    key_fingerprint: str | None
    failed_auths: int
    count_failure: Any  # (method) -> bool: one more failed attempt; True when it closed the connection
    _server_fault: bool
    disconnect: Any  # (reason) -> None
    _refuse_unaudited: Any  # (fingerprint) -> None

    async def second_factor_begin(self, policy: Policy) -> None:
        """A new login (or a new user name in the same connection): whether a code is wanted, and the secret."""
        self._key_proven = self.totp_verified = False
        self._totp_needed = totp_required(policy, self.user)
        self._totp_secret = await asyncio.to_thread(self.ctx.store.totp_secret, self.user) \
            if self._totp_needed else None

    @property
    def auth_method(self) -> str:
        """The audit rows' method: "publickey", or "publickey+totp" when a code was (or is being) asked for."""
        return METHOD if self._totp_needed else "publickey"

    def second_factor_refusal(self, policy: Policy) -> str | None:
        """Why a session may not begin although the key was proved: a code the policy (as it is now) wants and the
        client never gave."""
        if totp_required(policy, self.user) and not self.totp_verified:
            return "a verification code is required"
        return None

    # ---- asyncssh's callbacks ----------------------------------------------------------------

    def public_key_auth_supported(self) -> bool:
        """Public keys are the first method offered; once a key is proved and a code is wanted, no longer."""
        return not self._key_proven

    def kbdint_auth_supported(self) -> bool:
        """Keyboard-interactive only for the code, after a proved key (the other methods a client tries get
        USERAUTH_FAILURE listing what is left)."""
        return self._key_proven and self._totp_needed and not self.totp_verified

    def more_auth_required(self, username: str, method: str) -> bool:
        """Return True when `method` succeeded but the login needs the code as well (partial success; called by
        transport/partial_auth.py). A user who needs a code and has no secret is refused here, with the fix."""
        if method != "publickey" or not self._totp_needed or self.totp_verified:
            return False
        self._key_proven = True
        stored = getattr(self, "_keys", {}).get(self.key_fingerprint)
        certificate = getattr(self, "certificate", None)
        key_type = getattr(self, "_certificate_key_type", "") if certificate or not stored else stored.key_type
        self.auth_log.partial_publickey(key_type, self.key_fingerprint or "", certificate)
        if self._totp_secret is None:
            self.log.info("login refused: %s", NOT_ENROLLED)
            self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, METHOD, self.key_fingerprint,
                                       "failure", NOT_ENROLLED)
            self.disconnect("login refused: a verification code is required; ask your bastion admin to enrol you "
                            "(bastion user totp enroll)")
            return True
        self.log.info("key %s accepted; asking for a verification code", self.key_fingerprint)
        if self.ctx.config.login_grace_seconds:  # 0: no login timer at all
            transport.restart_login_timer(self.conn, max(self.ctx.config.login_grace_seconds, CODE_ENTRY_SECONDS))
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        """One prompt, echo off: the code."""
        return "", "", "", ((PROMPT, False),)

    async def validate_kbdint_response(self, username: str, responses: Any) -> bool:
        """Return True for a right, new code in its time window: the login then succeeds (auth_completed). A wrong
        or used code is logged, audited and counted toward max_auth_tries; False lets the client try again."""
        if not self.kbdint_auth_supported():
            return False
        if not self.ctx.audit.healthy:
            self._refuse_unaudited(self.key_fingerprint)
            return False
        try:
            enrolled = await asyncio.to_thread(self.ctx.store.totp_secret, self.user)  # a reset meanwhile counts
            reason = NOT_ENROLLED
            if enrolled is not None:
                secret, last_step = enrolled
                check = check_code(secret, responses[0] if len(responses) == 1 else "", utc_now().timestamp(),
                                   last_step)
                reason = check.refusal or ""
                if check.step is not None and not await asyncio.to_thread(self.ctx.store.totp_accept, self.user,
                                                                          check.step):
                    reason = USED  # another login took this step between our read and our write
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("cannot read the user's TOTP secret")
            self._server_fault = True
            self.disconnect("internal error while checking the login; ask your bastion admin to check its log")
            return False
        if not reason:
            self.totp_verified = True
            self.log.info("verification code accepted")
            return True
        self.log.info("verification code refused: %s", reason)
        self.auth_log.failed_keyboard_interactive()
        self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, METHOD, self.key_fingerprint,
                                   "failure", reason)
        if not self.count_failure(METHOD) and reason == NOT_ENROLLED:  # not already closed at max_auth_tries
            self.disconnect("login refused: a verification code is required; ask your bastion admin to enrol you "
                            "(bastion user totp enroll)")
        return False
