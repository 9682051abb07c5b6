"""The store's schema in PostgreSQL (#22) and its migrations, like the SQLite ones (schema.py): appended, never
edited; `store_schema_version` says which have run (not `schema_version`: the fleet's audit trail, audit/fleet.py,
may live in the same database and has its own). `bastion store migrate` runs them, explicitly: a node or a CLI
command never changes a shared schema on its own, it says to run the migration.

Only the store's tables are here: users, keys, groups, CAs, the [revoked] list, TOTP, the policy version. The
audit log stays local to each node (SQLite; shipped by audit/shipper.py)."""

from __future__ import annotations

from typing import Any

from ..errors import StoreError

MIGRATIONS: tuple[str, ...] = (
    # 1: the store as SQLite's migrations 1, 4, 5, 6 and 7 left it (the columns the same, so the SQL is shared)
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('policy_version', '0');

    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,          -- JSON: groups, allow, deny, expires
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );

    CREATE TABLE user_keys (
        "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        fingerprint TEXT NOT NULL,
        key_type TEXT NOT NULL,
        public_key TEXT NOT NULL,
        comment TEXT NOT NULL,
        added_at TEXT NOT NULL,
        options TEXT NOT NULL DEFAULT '{}',
        source TEXT NOT NULL DEFAULT 'cli' CHECK (source IN ('cli', 'import', 'policy')),
        PRIMARY KEY ("user", fingerprint)
    );

    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );

    CREATE TABLE cas (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );

    CREATE TABLE totp (
        "user" TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
        secret TEXT NOT NULL,
        last_step BIGINT,
        enrolled_at TEXT NOT NULL
    );

    CREATE TABLE revoked (
        id BIGSERIAL NOT NULL,             -- the order written (SQLite's rowid)
        kind TEXT NOT NULL CHECK (kind IN ('serial', 'key_id', 'fingerprint')),
        ca TEXT NOT NULL DEFAULT '',
        value TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (kind, ca, value)
    );
    """,
    # 2: the fleet's home CA (`bastion ca init`, #21): its public key, which every node trusts as CA `home`, where
    # its private key is (the one home `ca init` ran in), and the last serial issued, raised in the transaction of
    # each `ca sign` so no two certificates of the fleet share one (store/home_ca.py). SQLite keeps these in the
    # home's files (user_ca_key.pub, user_ca_key.serial) as before.
    """
    CREATE TABLE home_ca (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        public_key TEXT,                   -- "ssh-ed25519 AAAA…"; NULL until `ca init` or `store copy`
        fingerprint TEXT,
        key_home TEXT,                     -- where the private key is: "host:/path/of/the/home"
        created_at TEXT,
        last_serial BIGINT NOT NULL DEFAULT 0 CHECK (last_serial >= 0)
    );
    INSERT INTO home_ca (id) VALUES (1);
    """,
)

_LOCK = 22022201  # pg_advisory_xact_lock: two `store migrate` at once take turns


def schema_version(conn: Any) -> int:
    if not conn.execute("SELECT to_regclass('store_schema_version') IS NOT NULL").fetchone()[0]:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM store_schema_version").fetchone()[0]


def migrate(conn: Any) -> tuple[int, int]:
    """Run the migrations not yet applied, all in one transaction; (version before, version now)."""
    with conn.transaction():
        conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK})")
        conn.execute("CREATE TABLE IF NOT EXISTS store_schema_version (version INTEGER PRIMARY KEY, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        before = schema_version(conn)
        check(before)
        for number in range(before + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[number - 1])
            conn.execute("INSERT INTO store_schema_version (version) VALUES (%s)", [number])
    return before, len(MIGRATIONS)


def check(version: int, where: str = "") -> None:
    """A store this bastion can use as it is, or a StoreError saying what to run."""
    prefix = f"{where}: " if where else ""
    if version > len(MIGRATIONS):
        raise StoreError(f"{prefix}store schema version {version} is newer than this bastion ({len(MIGRATIONS)}); "
                         "upgrade bastion")
    if where and version < len(MIGRATIONS):
        state = "no bastion store here yet" if version == 0 else f"store schema version {version} is old"
        raise StoreError(f"{prefix}{state}; run `bastion store migrate` (once, from any node)")
