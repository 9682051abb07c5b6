"""What a policy change does to people's access: grants added, removed or narrowed, per user, and groups
added or removed, and trusted user CAs added, removed or changed. Built on effective access (access.py), so a rule that moves from a user to a group they are
in, unchanged, shows as moved rather than as lost.

Pure: no I/O, no clock; `now` is a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .access import Grant, effective_grants
from .model import Policy


@dataclass(frozen=True)
class GrantChange:
    user: str
    before: Grant | None  # None: newly granted
    after: Grant | None  # None: removed

    @property
    def removes_access(self) -> bool:
        """Removed, or narrowed: an earlier end, or a deny that now cuts into it."""
        if self.after is None:
            return True
        if self.before is None:
            return False
        earlier = self.after.expires is not None and (self.before.expires is None
                                                      or self.after.expires < self.before.expires)
        return earlier or not set(self.after.except_) <= set(self.before.except_)


@dataclass(frozen=True)
class PolicyDiff:
    changes: tuple[GrantChange, ...]
    groups_added: tuple[str, ...]
    groups_removed: tuple[str, ...]
    users_added: tuple[str, ...]
    cas_added: tuple[str, ...] = ()
    cas_removed: tuple[str, ...] = ()
    cas_changed: tuple[str, ...] = ()  # other keys or settings under the same name
    revoked_added: tuple[str, ...] = ()  # [revoked] entries (#21): "serials 10-20 of CA corp", "key id x", "key …"
    revoked_removed: tuple[str, ...] = ()
    # login requirements (require_totp, …) of users and groups, on or off: ("user alice", "require_totp", True)
    requirements: tuple[tuple[str, str, bool], ...] = ()

    @property
    def removes_access(self) -> bool:
        """A requirement switched on counts: a user not ready for it (no code enrolled) is locked out."""
        return any(change.removes_access for change in self.changes) or bool(
            self.cas_removed or self.cas_changed or self.revoked_added) or any(on for _, _, on in self.requirements)

    @property
    def empty(self) -> bool:
        return not (self.changes or self.groups_added or self.groups_removed or self.users_added
                    or self.cas_added or self.cas_removed or self.cas_changed or self.revoked_added
                    or self.revoked_removed or self.requirements)


def revoked_entries(policy: Policy) -> list[str]:
    """The [revoked] list, one entry a line as the plan shows it."""
    revoked = policy.revoked
    return ([f"serial {low} of CA {ca}" if low == high else f"serials {low}-{high} of CA {ca}"
             for ca, low, high in revoked.serials]
            + [f"certificate key id {key_id!r}" for key_id in revoked.key_ids]
            + [f"key {fingerprint}" for fingerprint in revoked.fingerprints])


REQUIREMENTS = ("require_totp", "require_security_key", "require_user_verification")


def requirement_changes(before: Policy, after: Policy) -> tuple[tuple[str, str, bool], ...]:
    """Login requirements switched on or off, for every user and group in `after` (a new one counts from off)."""
    found = []
    for kind, old, new in (("user", before.users, after.users), ("group", before.groups, after.groups)):
        for name in sorted(new):
            for field in REQUIREMENTS:
                was = bool(getattr(old[name], field, False)) if name in old else False
                now = bool(getattr(new[name], field, False))
                if was != now:
                    found.append((f"{kind} {name}", field, now))
    return tuple(found)


def _identity(grant: Grant) -> tuple[str, str, str, str]:
    """What a grant is, apart from when it ends and what cuts into it."""
    return grant.kind, grant.rule, grant.via, grant.ports


def policy_diff(before: Policy, after: Policy, now: datetime) -> PolicyDiff:
    """Every user's effective grants before and after, compared; users in name order, grants in policy order."""
    changes: list[GrantChange] = []
    for user in sorted(set(before.users) | set(after.users)):
        old = {_identity(grant): grant for grant in effective_grants(before, user, now)}
        new = {_identity(grant): grant for grant in effective_grants(after, user, now)}
        for key, grant in old.items():
            if key not in new:
                changes.append(GrantChange(user, grant, None))
            elif new[key] != grant:
                changes.append(GrantChange(user, grant, new[key]))
        changes += [GrantChange(user, None, grant) for key, grant in new.items() if key not in old]
    return PolicyDiff(
        changes=tuple(changes),
        groups_added=tuple(sorted(set(after.groups) - set(before.groups))),
        groups_removed=tuple(sorted(set(before.groups) - set(after.groups))),
        users_added=tuple(sorted(set(after.users) - set(before.users))),
        cas_added=tuple(sorted(set(after.cas) - set(before.cas))),
        cas_removed=tuple(sorted(set(before.cas) - set(after.cas))),
        cas_changed=tuple(sorted(name for name in set(before.cas) & set(after.cas)
                                 if before.cas[name] != after.cas[name])),
        revoked_added=tuple(e for e in revoked_entries(after) if e not in revoked_entries(before)),
        revoked_removed=tuple(e for e in revoked_entries(before) if e not in revoked_entries(after)),
        requirements=requirement_changes(before, after),
    )
