"""Every allow or refuse the gateway makes, as pure functions over the policy model: channels
(`evaluate`, whose order of checks is in policy/model.py's docstring), listeners (`evaluate_listen`),
logins and live sessions (`login_refusal`), the per-user channel cap, and when the next expiry is due.

Pure: no asyncssh, SQLite, clock or logging. Time arrives on the request.
"""

from __future__ import annotations

from datetime import datetime
from ipaddress import IPv6Address

from .model import (
    ASK_ACCESS,
    ASK_EXCEPTION,
    ASK_GRANT,
    ASK_RENEWAL,
    AccessRequest,
    Decision,
    ListenRequest,
    ListenRule,
    Policy,
    UserPolicy,
    format_time,
)
from .netguard import IPAddress, NetGuard, canonical_address


def evaluate(policy: Policy, guard: NetGuard, request: AccessRequest) -> Decision:
    """Decide `request`; the order of checks is in the module docstring. `request.extra_groups` (a certificate's
    principals naming groups, #21) add those groups' rules; an unknown user with some (its CA does not require
    known users) has their rules only."""
    user = _user(policy, request.user, request.extra_groups)
    if user is None:
        return _deny(f"unknown user{ASK_ACCESS}")
    now = request.now
    if user.expires is not None and now >= user.expires:
        return _deny(f"access for {user.name} expired at {format_time(user.expires)}{ASK_RENEWAL}")
    endpoint = _endpoint(request.host, request.port)
    addresses = tuple(canonical_address(a) for a in request.addresses)
    if not addresses:
        return _deny(f"{request.host} did not resolve to an address")
    for address in addresses:
        reason = guard.refusal(address)
        if reason is not None:
            return _deny(reason)

    for origin, rule in policy.denials_for(user.name, request.extra_groups):
        if not rule.expired(now) and any(
                rule.matches(request.host, a, request.port) for a in addresses):
            return _deny(f"{endpoint} is denied by policy{ASK_EXCEPTION}", f"{origin}: {rule.text}")

    grants = [(origin, rule) for origin, rule in policy.grants_for(user.name, request.extra_groups)
              if not rule.expired(now)]
    deciding: str | None = None
    for address in addresses:
        match = next((f"{origin}: {rule.text}" for origin, rule in grants
                      if rule.matches(request.host, address, request.port)), None)
        if match is None:
            return _deny(f"{user.name} may not reach {endpoint}{ASK_GRANT}")
        deciding = deciding or match
    return Decision(True, "granted", deciding, addresses[0])


def _user(policy: Policy, name: str, extra_groups: tuple[str, ...]) -> UserPolicy | None:
    """The user deciding a request: the policy's, or for an unknown user with extra groups one with no rules
    of its own (its certificate's CA lets unknown users in, and its principals name the groups)."""
    user = policy.users.get(name)
    if user is None and any(group in policy.groups for group in extra_groups):
        return UserPolicy(name=name)
    return user


def _deny(reason: str, rule: str | None = None) -> Decision:
    return Decision(False, reason, rule, None)


def _endpoint(host: IPAddress | str, port: int) -> str:
    return f"[{host}]:{port}" if isinstance(host, IPv6Address) else f"{host}:{port}"



def next_expiry(policy: Policy, now: datetime) -> datetime | None:
    """The first moment after `now` at which a user or a grant expires, so live sessions can be
    re-checked exactly then; None when nothing is due to expire."""
    moments = []
    for user in policy.users.values():
        moments.append(user.expires)
        moments += [rule.expires for rule in (*user.allow, *user.deny, *user.listen)]
    for group in policy.groups.values():
        moments += [rule.expires for rule in (*group.allow, *group.deny, *group.listen)]
    future = [moment for moment in moments if moment is not None and moment > now]
    return min(future, default=None)


def _listen_rules(policy: Policy, user: str, now: datetime,
                  extra_groups: tuple[str, ...] = ()) -> list[tuple[str, ListenRule]]:
    return [(origin, rule) for origin, rule in policy.rules_for(user, "listen", extra_groups) if not rule.expired(now)]


def evaluate_listen(policy: Policy, request: ListenRequest) -> Decision:
    """Deny unless an unexpired listen rule of the user or its groups grants this bind and port."""
    user = _user(policy, request.user, request.extra_groups)
    if user is None:
        return Decision(False, f"unknown user{ASK_ACCESS}", None, None)
    if user.expires is not None and request.now >= user.expires:
        return Decision(False, f"access for {user.name} expired{ASK_RENEWAL}", None, None)
    if not 0 <= request.port <= 65535:
        return Decision(False, "port must be 0..65535", None, None)
    for origin, rule in _listen_rules(policy, request.user, request.now, request.extra_groups):
        if rule.matches(request.bind, request.port):
            return Decision(True, "granted", f"{origin}: {rule.text}", request.bind)
    where = f"[{request.bind}]" if request.bind.version == 6 else str(request.bind)
    port = "a port of its choosing" if request.port == 0 else str(request.port)
    return Decision(False, f"{request.user} may not listen on {where}:{port}{ASK_GRANT}", None, None)


def listen_ranges(policy: Policy, user: str, bind: IPAddress, now: datetime,
                  extra_groups: tuple[str, ...] = ()) -> list[tuple[int, int]]:
    """The port ranges granted to `user` (with a certificate's `extra_groups`) on `bind` now (for port 0)."""
    ranges: list[tuple[int, int]] = []
    for _, rule in _listen_rules(policy, user, now, extra_groups):
        if rule.bind == bind:
            ranges.extend(r for r in rule.ports.ranges if r not in ranges)
    return ranges


def login_refusal(
    policy: Policy, user: str, fingerprint: str | None, fingerprints: frozenset[str], now: datetime
) -> str | None:
    """Why this user and key may not log in, or a logged-in session may no longer continue; None if they may.
    `fingerprints` are the user's keys in the store now. Grants are not looked at here: they are checked per
    channel with evaluate()."""
    user_policy = policy.users.get(user)
    if user_policy is None:
        return "user removed"
    if fingerprint not in fingerprints:
        return "key removed"
    if user_policy.expires is not None and now >= user_policy.expires:
        return f"access expired at {user_policy.expires:%Y-%m-%dT%H:%M:%SZ}"
    return None


def channel_cap_refusal(user: str, open_channels: int, limit: int) -> Decision | None:
    """A refusal when the user already holds `limit` channels (open or being opened), else None."""
    if open_channels < limit:
        return None
    return Decision(False, f"too many open channels for {user} (limit {limit}); close some or ask your bastion admin",
                    None, None)


def session_cap_refusal(user: str, sessions: int, limit: int) -> Decision | None:
    """A refusal when the user has more than `limit` sessions, counting the one being decided, else None."""
    if sessions <= limit:
        return None
    return Decision(False, f"too many concurrent sessions for {user} (limit {limit}); close one or ask your bastion "
                           "admin", None, None)
