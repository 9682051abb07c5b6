"""Users, their public keys and the policy, kept in SQLite. Synchronous: the CLI calls it directly,
the server through a worker thread (see `PolicyCache`)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from dataclasses import dataclass, replace
from datetime import datetime, timezone, tzinfo
from typing import Iterable

from ..clock import iso, utc_now
from ..errors import StoreError
from ..policy.file import policy_from_dict, policy_to_dict
from ..policy.authorized_keys import KeyOptions, parse_options, split_line
from ..policy.model import NAME_HINT, NAME_PATTERN, Policy, PolicyError, RevokedList, UserPolicy
from .dialect import PostgresDatabase, SqliteDatabase, is_postgres
from .interface import PublicKey
from .schema import migrate



def parse_public_keys(text: str, source: str = "key", local_zone: tzinfo | None = None) -> list[PublicKey]:
    """Every key of an OpenSSH public key file or `authorized_keys` file, with the options of its line
    (policy/authorized_keys.py says which are honoured; any other is an error naming it). Blank and '#' lines
    are skipped. A key too weak to log in with (DSA, RSA under 2048 bits) is an error naming it. Every error
    is "FILE:LINE: what"; all of them are collected, so one run shows every line to fix."""
    import asyncssh  # here, not at the top: the CLI should not pay for it on every command

    from ..policy.keys import describe_key, weak_key_reason

    zone = local_zone or datetime.now().astimezone().tzinfo or timezone.utc  # sshd reads expiry-time as local
    keys, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            options_text, key_text = split_line(line)
            options = parse_options(options_text, zone)
        except PolicyError as exc:
            problems.append(f"{where}: {exc}")
            continue
        try:
            key = asyncssh.import_public_key(key_text)
        except (asyncssh.KeyImportError, ValueError) as exc:
            problems.append(f"{where}: not an OpenSSH public key ({exc})")
            continue
        weakness = weak_key_reason(key)
        if weakness:
            problems.append(f"{where}: {describe_key(key.public_data, key.get_comment() or '')}: {weakness}")
            continue
        keys.append(
            PublicKey(
                fingerprint=key.get_fingerprint("sha256"),
                key_type=key.get_algorithm(),
                public_key=" ".join(key.export_public_key("openssh").decode().split()[:2]),
                comment=key.get_comment() or "",
                options=options,
            )
        )
    if problems:
        raise StoreError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} lines refused: " + "; ".join(problems))
    if not keys:
        raise StoreError(f"{source}: no public key found")
    return keys


class PolicyRefused(StoreError):
    """A policy that cannot be applied as it is (a problem found, exit 1), as opposed to bad usage."""


@dataclass(frozen=True)
class PolicyPlan:
    """What a policy apply changes: the policy before and after, and the keys a policy file adds or removes."""

    version: int  # of the store the plan was made against
    current: Policy
    target: Policy
    keys_added: list[tuple[str, PublicKey]]
    keys_removed: list[tuple[str, PublicKey]]


@dataclass(frozen=True)
class Snapshot:
    """Everything the gateway reads from the store, read in one transaction (#22: a node on PostgreSQL holds
    it in memory and reads it again when told of a change)."""

    version: int
    policy: Policy
    keys: dict[str, list[PublicKey]]
    totp: dict[str, tuple[str, int | None]]


class Store:
    """The users/keys/policy tables. Thread-safe: one connection behind a lock.

    `location`: the SQLite file (migrated on open, as always), or a "postgresql://…" URL (#22): the same methods
    and SQL through dialect.py; its schema must have been migrated (`bastion store migrate`)."""

    def __init__(self, location: Path | str, *, statement_timeout_ms: int = 0, check_schema: bool = True):
        self._lock = threading.Lock()
        self._db: SqliteDatabase | PostgresDatabase
        if is_postgres(location):
            from . import pg_schema

            self.path = None
            self._db = PostgresDatabase(str(location), statement_timeout_ms=statement_timeout_ms)
            if check_schema:
                try:
                    version = pg_schema.schema_version(self._db._live())
                    pg_schema.check(version, self._db.where)
                except BaseException:
                    self._db.close()
                    raise
        else:
            self.path = Path(location)
            self._db = SqliteDatabase(self.path)
            with self._lock:
                migrate(self._db.db)

    @property
    def dialect(self) -> str:
        return self._db.dialect

    @property
    def where(self) -> str:
        """The file, or the URL without its password: for messages."""
        return self._db.where

    def close(self) -> None:
        self._db.close()

    # ---- users and keys -------------------------------------------------------------------

    def add_user(self, name: str, keys: Iterable[PublicKey], *, source: str = "cli",
                 create: bool = True) -> list[tuple[PublicKey, str]]:
        """Create the user if new (unless `create` is False: then an unknown user is an error) and add the keys
        it does not have yet; a key it has gets the options given now. Returns (key, "added" | "updated") for
        every key that changed."""
        return self.import_keys({name: list(keys)}, source=source, create=create)[name]

    def import_keys(self, keys_by_user: dict[str, list[PublicKey]], *, source: str = "import",
                    create: bool = True) -> dict[str, list[tuple[PublicKey, str]]]:
        """add_user for several users in one transaction: all or nothing."""
        for name in keys_by_user:
            if not NAME_PATTERN.fullmatch(name):  # the same rule as policy files
                raise StoreError(f"invalid user name {name!r}: expected {NAME_HINT}")
        now = iso(utc_now())
        changes: dict[str, list[tuple[PublicKey, str]]] = {}
        with self._lock, self._db.transaction():
            for name, keys in keys_by_user.items():
                if not create and self._db.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone() is None:
                    raise StoreError(f"no user named {name!r}; add it with `bastion user add {name} --key FILE`")
                self._db.execute(
                    "INSERT INTO users (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    [name, json.dumps(_user_definition(UserPolicy(name=name))), now, now],
                )
                changes[name] = [(key, change) for key in keys
                                 if (change := self._put_key(name, replace(key, source=source), now))]
            self._bump_policy_version()
        return changes

    def _put_key(self, name: str, key: PublicKey, now: str) -> str | None:
        """Insert the key, or give a stored one the new options; "added", "updated" or None (unchanged). A key
        keeps the source it was first added by: a policy apply never removes a key a person added."""
        options = json.dumps(key.options.to_json(), sort_keys=True)
        row = self._db.execute("SELECT options FROM user_keys WHERE \"user\" = ? AND fingerprint = ?",
                               [name, key.fingerprint]).fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO user_keys (\"user\", fingerprint, key_type, public_key, comment, added_at, options, "
                "source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [name, key.fingerprint, key.key_type, key.public_key, key.comment, now, options, key.source],
            )
            return "added"
        if row[0] != options:
            self._db.execute("UPDATE user_keys SET options = ? WHERE \"user\" = ? AND fingerprint = ?",
                             [options, name, key.fingerprint])
            return "updated"
        return None

    def remove_user(self, name: str) -> None:
        with self._lock, self._db.transaction():
            if not self._db.execute("DELETE FROM users WHERE name = ?", [name]).rowcount:
                raise StoreError(f"no user named {name!r}")
            self._bump_policy_version()

    def remove_key(self, name: str, fingerprint: str) -> None:
        with self._lock, self._db.transaction():
            cursor = self._db.execute("DELETE FROM user_keys WHERE \"user\" = ? AND fingerprint = ?",
                                      [name, fingerprint])
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
                        {"fingerprint": k["fingerprint"], "type": k["key_type"], "comment": k["comment"],
                         "options": KeyOptions.from_json(json.loads(k["options"])).describe(),
                         "source": k["source"]}
                        for k in keys
                        if k["user"] == row["name"]
                    ],
                }
            )
        return result

    def user_keys(self, name: str) -> list[PublicKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT fingerprint, key_type, public_key, comment, options, source FROM user_keys WHERE \"user\" = ?",
                [name],
            ).fetchall()
        return [PublicKey(*row[:4], options=KeyOptions.from_json(json.loads(row[4])), source=row[5])
                for row in rows]

    # ---- policy ---------------------------------------------------------------------------

    def policy_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])

    def load_policy(self) -> tuple[int, Policy]:
        """The stored policy and its version, read in one transaction so they match."""
        with self._lock:
            return self._read_policy()

    def _read_policy(self) -> tuple[int, Policy]:
        with self._db.read_transaction():
            return self._read_policy_rows()

    def _read_policy_rows(self) -> tuple[int, Policy]:
        """The reads of _read_policy, inside the caller's transaction."""
        version = int(self._db.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])
        users = self._db.execute("SELECT name, definition FROM users").fetchall()
        groups = self._db.execute("SELECT name, definition FROM groups").fetchall()
        cas = self._db.execute("SELECT name, definition FROM cas").fetchall()
        revoked = self._db.execute(f"SELECT kind, ca, value FROM revoked ORDER BY {self._db.rowid}").fetchall()
        data = {
            "users": {name: json.loads(definition) for name, definition in users},
            "groups": {name: json.loads(definition) for name, definition in groups},
            "cas": {name: json.loads(definition) for name, definition in cas},
            "revoked": _revoked_data(revoked),  # (#21)
        }
        return version, policy_from_dict(data)

    def plan_policy(self, declared: Policy) -> PolicyPlan:
        """What applying `declared` would change, without changing anything (see apply_policy)."""
        new_keys = {
            name: parse_public_keys("\n".join(user.keys), f"users.{name}.keys")
            for name, user in declared.users.items()
            if user.keys is not None
        }
        with self._lock:
            version, current = self._read_policy()
            stored = self._db.execute("SELECT \"user\", fingerprint, key_type, public_key, comment, options, source "
                                      "FROM user_keys").fetchall()
        target = declared.declared_over(current)
        problems = target.problems()
        if problems:
            raise PolicyRefused("policy not applied: " + "; ".join(problems))
        have = {(row[0], row[1]) for row in stored}
        wanted = {(name, key.fingerprint) for name, keys in new_keys.items() for key in keys}
        removed = [(row[0], PublicKey(*row[1:5], options=KeyOptions.from_json(json.loads(row[5])), source=row[6]))
                   for row in stored if row[6] == "policy" and (row[0], row[1]) not in wanted]
        added = [(name, replace(key, source="policy")) for name, keys in new_keys.items() for key in keys
                 if (name, key.fingerprint) not in have]
        return PolicyPlan(version, current, target, added, removed)

    def apply_policy(self, declared: Policy, *, expected_version: int | None = None) -> PolicyPlan:
        """Make the stored policy equal to `declared`, in one transaction (all or nothing):
        - every group is the file's, and groups it does not name are removed; the same for trusted CAs (#21);
        - every user it names gets exactly its definition; a user it does not name keeps its keys but loses
          its grants (users are removed only by `user remove`);
        - keys: a user's `keys` in the file are added, and keys that an earlier policy file added and this one
          no longer lists are removed. Keys added by `user add` or `user import` are never touched.
        `expected_version`: refuse if the store changed since the plan shown to the admin was made."""
        plan = self.plan_policy(declared)
        if expected_version is not None and plan.version != expected_version:
            raise PolicyRefused("policy not applied: the store changed since the plan was shown; run it again")
        now = iso(utc_now())
        with self._lock:
            try:
                with self._db.transaction():
                    version = int(self._db.execute(
                        "SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])
                    if version != plan.version:
                        raise PolicyRefused("policy not applied: the store changed while planning; run it again")
                    for name, user in plan.target.users.items():
                        self._db.execute(
                            "INSERT INTO users (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, "
                            "updated_at = excluded.updated_at",
                            [name, json.dumps(_user_definition(user)), now, now],
                        )
                    self._delete_others("groups", plan.target.groups)
                    for name, group in plan.target.groups.items():
                        definition = policy_to_dict(Policy(users={}, groups={name: group}))["groups"][name]
                        self._db.execute(
                            "INSERT INTO groups (name, definition, updated_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, "
                            "updated_at = excluded.updated_at",
                            [name, json.dumps(definition), now],
                        )
                    self._delete_others("cas", plan.target.cas)
                    for name, ca in plan.target.cas.items():
                        definition = policy_to_dict(Policy(cas={name: ca}))["cas"][name]
                        self._db.execute(
                            "INSERT INTO cas (name, definition, updated_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, "
                            "updated_at = excluded.updated_at",
                            [name, json.dumps(definition), now],
                        )
                    self._db.execute("DELETE FROM revoked")  # (#21) declared state: the files' list only
                    self._db.executemany(
                        "INSERT INTO revoked (kind, ca, value, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT DO NOTHING",
                        [(kind, ca, value, now) for kind, ca, value in _revoked_rows(plan.target.revoked)])
                    for name, key in plan.keys_removed:
                        self._db.execute("DELETE FROM user_keys WHERE \"user\" = ? AND fingerprint = ? "
                                         "AND source = 'policy'", [name, key.fingerprint])
                    for name, key in plan.keys_added:
                        self._put_key(name, key, now)
                    self._bump_policy_version()
            except self._db.errors as exc:
                raise StoreError(f"policy not applied: database error: {exc}") from None
        return plan

    # ---- the second factor (#21) -----------------------------------------------------------------

    def totp_enroll(self, name: str, secret: str, *, force: bool = False) -> None:
        """Give the user a TOTP secret (policy/totp.py). An enrolled user keeps theirs unless `force`: a new
        secret makes their authenticator app's codes wrong. Never logged or audited."""
        with self._lock, self._db.transaction():
            if self._db.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone() is None:
                raise StoreError(f"no user named {name!r}; add it with `bastion user add {name} --key FILE`")
            if not force and self._db.execute("SELECT 1 FROM totp WHERE \"user\" = ?", [name]).fetchone():
                raise StoreError(f"{name} is already enrolled; `--force` gives a new secret (the old codes stop "
                                 "working), `user totp reset` removes it")
            self._db.execute("INSERT INTO totp (\"user\", secret, last_step, enrolled_at) VALUES (?, ?, NULL, ?) "
                             "ON CONFLICT (\"user\") DO UPDATE SET secret = excluded.secret, last_step = NULL, "
                             "enrolled_at = excluded.enrolled_at", [name, secret, iso(utc_now())])
            self._bump_policy_version()  # (#22) the other nodes read the new secret

    def totp_reset(self, name: str) -> None:
        """Remove the user's TOTP secret: a user who needs a code cannot log in until enrolled again."""
        with self._lock, self._db.transaction():
            if not self._db.execute("DELETE FROM totp WHERE \"user\" = ?", [name]).rowcount:
                raise StoreError(f"{name!r} has no TOTP secret (not enrolled)")
            self._bump_policy_version()  # (#22)

    def totp_secret(self, name: str) -> tuple[str, int | None] | None:
        """The user's TOTP secret and the last time step accepted (None: none yet); None when not enrolled."""
        with self._lock:
            row = self._db.execute("SELECT secret, last_step FROM totp WHERE \"user\" = ?", [name]).fetchone()
        return None if row is None else (row[0], row[1])

    def totp_accept(self, name: str, step: int) -> bool:
        """Record that the code for `step` was used; False when that step or a later one already was (a replay,
        also from another worker process or a concurrent login: the update is one statement)."""
        with self._lock, self._db.transaction():
            return self._db.execute("UPDATE totp SET last_step = ? WHERE \"user\" = ? AND (last_step IS NULL OR "
                                    "last_step < ?)", [step, name, step]).rowcount == 1

    def _bump_policy_version(self) -> int:
        """A new version, in the caller's transaction; on PostgreSQL every node is told of it at commit (#22)."""
        version = int(self._db.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
                                       "WHERE key = 'policy_version' RETURNING value").fetchone()[0])
        self._db.notify(version)
        return version

    def _delete_others(self, table: str, keep: Iterable[str]) -> None:
        names = list(keep)
        if names:
            self._db.execute(f"DELETE FROM {table} WHERE name NOT IN ({','.join('?' * len(names))})", names)
        else:
            self._db.execute(f"DELETE FROM {table}")

    # ---- what a node holds (#22) -----------------------------------------------------------------

    def policy_in_force(self) -> tuple[int, Policy]:
        """The policy and its version as a node holds them: on PostgreSQL with the fleet's home CA trusted (#22), so
        `policy show` and `doctor` on a node without the CA's private key show what its logins are decided by."""
        with self._lock, self._db.read_transaction():
            return self._policy_in_force_rows()

    def _policy_in_force_rows(self) -> tuple[int, Policy]:
        version, policy = self._read_policy_rows()
        if self._db.dialect == "postgresql":  # (#22) the fleet's home CA, trusted on every node (home_ca.py)
            from . import home_ca

            policy = home_ca.trusted(self._db, policy)
        return version, policy

    def snapshot(self) -> Snapshot:
        """The policy, its version, every user's keys and TOTP state, read together (one transaction)."""
        with self._lock, self._db.read_transaction():
            version, policy = self._policy_in_force_rows()
            rows = self._db.execute("SELECT \"user\", fingerprint, key_type, public_key, comment, options, source "
                                    "FROM user_keys ORDER BY added_at").fetchall()
            totp = self._db.execute("SELECT \"user\", secret, last_step FROM totp").fetchall()
        keys: dict[str, list[PublicKey]] = {}
        for row in rows:
            keys.setdefault(row[0], []).append(
                PublicKey(*row[1:5], options=KeyOptions.from_json(json.loads(row[5])), source=row[6]))
        return Snapshot(version, policy, keys, {row[0]: (row[1], row[2]) for row in totp})

    def login_refusal(self) -> str | None:
        """Why new logins are refused because of the store itself; never, for a store read directly."""
        return None


def _revoked_rows(revoked: RevokedList) -> list[tuple[str, str, str]]:
    """The [revoked] list as rows of the `revoked` table (#21)."""
    return ([("serial", ca, f"{low}-{high}") for ca, low, high in revoked.serials]
            + [("key_id", "", key_id) for key_id in revoked.key_ids]
            + [("fingerprint", "", fingerprint) for fingerprint in revoked.fingerprints])


def _revoked_data(rows: list[tuple[str, str, str]]) -> dict:
    """The `revoked` table's rows as policy_from_dict reads them."""
    data: dict = {"serials": {}, "key_ids": [], "fingerprints": []}
    for kind, ca, value in rows:
        if kind == "serial":
            data["serials"].setdefault(ca, []).append(value)
        else:
            data[f"{kind}s"].append(value)
    return data


def _user_definition(user: UserPolicy) -> dict:
    """The stored JSON of one user: its policy without keys (keys live in user_keys)."""
    definition = policy_to_dict(Policy(users={user.name: user}, groups={}))["users"][user.name]
    definition.pop("keys", None)
    return definition
