"""Users, their public keys and the policy, kept in SQLite. Synchronous: the CLI calls it directly,
the server through a worker thread (see `PolicyCache`)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

from ..clock import iso, utc_now
from ..errors import StoreError
from ..policy.file import policy_from_dict, policy_to_dict
from ..policy.model import NAME_HINT, NAME_PATTERN, Policy, UserPolicy
from .interface import PublicKey
from .schema import migrate, open_database



def parse_public_keys(text: str, source: str = "key") -> list[PublicKey]:
    """Every key line of an OpenSSH public key file; blank and '#' lines are skipped. A key too weak to log
    in with (DSA, RSA under 2048 bits: algorithms.weak_key_reason) is an error naming it."""
    import asyncssh  # here, not at the top: the CLI should not pay for it on every command

    from ..policy.keys import describe_key, weak_key_reason

    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise StoreError(f"{source}:{number}: not an OpenSSH public key ({exc})") from None
        weakness = weak_key_reason(key)
        if weakness:
            raise StoreError(f"{source}:{number}: {describe_key(key.public_data, key.get_comment() or '')}: "
                             f"{weakness}")
        keys.append(
            PublicKey(
                fingerprint=key.get_fingerprint("sha256"),
                key_type=key.get_algorithm(),
                public_key=" ".join(key.export_public_key("openssh").decode().split()[:2]),
                comment=key.get_comment() or "",
            )
        )
    if not keys:
        raise StoreError(f"{source}: no public key found")
    return keys


class Store:
    """The users/keys/policy tables. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path):
        self.path = path
        self._db = open_database(path)
        self._lock = threading.Lock()
        with self._lock:
            migrate(self._db)

    def close(self) -> None:
        self._db.conn.close()

    # ---- users and keys -------------------------------------------------------------------

    def add_user(self, name: str, keys: Iterable[PublicKey]) -> list[PublicKey]:
        """Create the user if new and add keys it does not have yet; returns the keys added."""
        if not NAME_PATTERN.fullmatch(name):  # the same rule as policy files
            raise StoreError(f"invalid user name {name!r}: expected {NAME_HINT}")
        now = iso(utc_now())
        added = []
        with self._lock, self._db.conn:
            self._db.execute(
                "INSERT INTO users (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                [name, json.dumps(_user_definition(UserPolicy(name=name))), now, now],
            )
            for key in keys:
                cursor = self._db.execute(
                    "INSERT INTO user_keys (user, fingerprint, key_type, public_key, comment, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [name, key.fingerprint, key.key_type, key.public_key, key.comment, now],
                )
                if cursor.rowcount:
                    added.append(key)
            self._bump_policy_version()
        return added

    def remove_user(self, name: str) -> None:
        with self._lock, self._db.conn:
            if not self._db.execute("DELETE FROM users WHERE name = ?", [name]).rowcount:
                raise StoreError(f"no user named {name!r}")
            self._bump_policy_version()

    def remove_key(self, name: str, fingerprint: str) -> None:
        with self._lock, self._db.conn:
            cursor = self._db.execute("DELETE FROM user_keys WHERE user = ? AND fingerprint = ?", [name, fingerprint])
            if not cursor.rowcount:
                raise StoreError(f"user {name!r} has no key {fingerprint}")
            self._bump_policy_version()

    def list_users(self) -> list[dict]:
        with self._lock:
            users = list(self._db.query("SELECT name, definition, created_at FROM users ORDER BY name"))
            keys = list(self._db.query("SELECT * FROM user_keys ORDER BY added_at"))
        result = []
        for row in users:
            definition = json.loads(row["definition"])
            result.append(
                {
                    "name": row["name"],
                    "groups": definition.get("groups", []),
                    "expires": definition.get("expires"),
                    "created_at": row["created_at"],
                    "keys": [
                        {"fingerprint": k["fingerprint"], "type": k["key_type"], "comment": k["comment"]}
                        for k in keys
                        if k["user"] == row["name"]
                    ],
                }
            )
        return result

    def user_keys(self, name: str) -> list[PublicKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT fingerprint, key_type, public_key, comment FROM user_keys WHERE user = ?", [name]
            ).fetchall()
        return [PublicKey(*row) for row in rows]

    # ---- policy ---------------------------------------------------------------------------

    def policy_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])

    def load_policy(self) -> tuple[int, Policy]:
        """The stored policy and its version, read in one transaction so they match."""
        with self._lock:
            return self._read_policy()

    def _read_policy(self) -> tuple[int, Policy]:
        with self._db.conn:
            version = int(self._db.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])
            users = self._db.execute("SELECT name, definition FROM users").fetchall()
            groups = self._db.execute("SELECT name, definition FROM groups").fetchall()
        data = {
            "users": {name: json.loads(definition) for name, definition in users},
            "groups": {name: json.loads(definition) for name, definition in groups},
        }
        return version, policy_from_dict(data)

    def apply_policy(self, update: Policy) -> Policy:
        """Upsert every user and group of `update` in one transaction; all or nothing.

        Keys given in the file replace the user's stored keys; users without `keys` keep theirs.
        Returns the merged policy now in force."""
        new_keys = {
            name: parse_public_keys("\n".join(user.keys), f"users.{name}.keys")
            for name, user in update.users.items()
            if user.keys is not None
        }
        with self._lock:
            _, current = self._read_policy()
            merged = current.updated_with(update)
            problems = merged.problems()
            if problems:
                raise StoreError("policy not applied: " + "; ".join(problems))
            now = iso(utc_now())
            try:
                with self._db.conn:
                    for name, user in update.users.items():
                        self._db.execute(
                            "INSERT INTO users (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, "
                            "updated_at = excluded.updated_at",
                            [name, json.dumps(_user_definition(user)), now, now],
                        )
                        if name in new_keys:
                            self._db.execute("DELETE FROM user_keys WHERE user = ?", [name])
                            for key in new_keys[name]:
                                self._db.execute(
                                    "INSERT OR IGNORE INTO user_keys "
                                    "(user, fingerprint, key_type, public_key, comment, added_at) "
                                    "VALUES (?, ?, ?, ?, ?, ?)",
                                    [name, key.fingerprint, key.key_type, key.public_key, key.comment, now],
                                )
                    for name, group in update.groups.items():
                        definition = policy_to_dict(Policy(users={}, groups={name: group}))["groups"][name]
                        self._db.execute(
                            "INSERT INTO groups (name, definition, updated_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, "
                            "updated_at = excluded.updated_at",
                            [name, json.dumps(definition), now],
                        )
                    self._bump_policy_version()
            except sqlite3.Error as exc:
                raise StoreError(f"policy not applied: database error: {exc}") from None
        return merged

    def _bump_policy_version(self) -> None:
        self._db.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'policy_version'")


def _user_definition(user: UserPolicy) -> dict:
    """The stored JSON of one user: its policy without keys (keys live in user_keys)."""
    definition = policy_to_dict(Policy(users={user.name: user}, groups={}))["users"][user.name]
    definition.pop("keys", None)
    return definition
