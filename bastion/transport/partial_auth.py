"""A server that asks for a second method after the first succeeded: SSH_MSG_USERAUTH_FAILURE with partial success
(RFC 4252 §5.1), as sshd's `AuthenticationMethods publickey,keyboard-interactive` sends it (#21).

asyncssh 2.24.1's server has the field (`SSHConnection.send_userauth_failure(partial_success)`) but never sets it:
every method that succeeds goes through `ServerAuth.send_success()`, which sends USERAUTH_SUCCESS and ends the
login. No public hook sits between "this method succeeded" and "the user is logged in": `SSHServer.
validate_public_key(username, key)` is asked before the client has proved the key (the same call answers the query
and the signed request), and `auth_completed()` comes after USERAUTH_SUCCESS is on the wire.

This wraps `ServerAuth.send_success` -- one method, the single place every server auth method reports success --
with an optional server callback, written as asyncssh could take it upstream:

    SSHServer.more_auth_required(username: str, method: str) -> bool   (may be a coroutine)

        Called when `method` ("publickey", "keyboard-interactive", ...) has just succeeded for `username`.
        Return True if the user must pass another method as well: the client gets USERAUTH_FAILURE with partial
        success set, listing the methods the `*_auth_supported()` callbacks return *now* (so the server changes
        what those return to say what comes next). By default (no such method, or False) the login succeeds.

Everything else -- the methods list, asyncssh's single current auth (`conn.auth is self`), the login timer,
a new user name restarting the login with `begin_auth` -- is asyncssh's own. A client that tries a method the
server no longer lists is refused by asyncssh's `lookup_server_auth` as usual.

If a later asyncssh lacks `ServerAuth.send_success`, nothing is patched and `apply` returns False: the gateway then
refuses users who need a second factor (fails closed; see gateway/totp.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any

from asyncssh import auth

_PATCHED = "_bastion_partial_success"


def apply() -> bool:
    """Wrap `ServerAuth.send_success` once (idempotent). Returns whether the hook is in place."""
    original = getattr(auth.ServerAuth, "send_success", None)
    if original is None:
        return False
    if getattr(original, _PATCHED, False):
        return True

    @functools.wraps(original)
    async def send_success(self: Any) -> None:
        conn = self._conn
        more_auth_required = getattr(conn._owner, "more_auth_required", None)
        if conn.auth is self and more_auth_required is not None:
            method = self._method.decode("ascii", "replace")
            more = more_auth_required(self._username, method)
            if inspect.isawaitable(more):
                more = await more
            if conn.auth is not self:  # a new request arrived while the owner was deciding: it is in charge now
                return
            if more:
                conn.logger.info("Auth for user %s partially succeeded with %s", self._username, method)
                self.send_failure(partial_success=True)
                return
        await original(self)

    setattr(send_success, _PATCHED, True)
    auth.ServerAuth.send_success = send_success  # type: ignore[method-assign]
    return True


def restart_login_timer(conn: Any, seconds: float) -> bool:
    """Give the client `seconds` from now to finish logging in: asyncssh's login timer (`login_timeout`), started
    again. For a person typing a one-time code after the key, not for an anonymous client: the key is proved by
    then. Returns False, changing nothing, when there is no timer (login_timeout 0) or asyncssh lacks these names."""
    timer = getattr(conn, "_login_timer", None)
    expire = getattr(conn, "_login_timer_callback", None)
    if timer is None or expire is None:
        return False
    timer.cancel()
    conn._login_timer = asyncio.get_running_loop().call_later(seconds, expire)
    return True


def installed() -> bool:
    """Whether the partial-success hook is in place in this process."""
    return bool(getattr(getattr(auth.ServerAuth, "send_success", None), _PATCHED, False))
