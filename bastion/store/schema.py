"""The SQLite schema and its migrations; opening a database the same way everywhere.

Tables are STRICT with NOT NULL where it holds. A migration is appended, never edited:
`PRAGMA user_version` says how many have run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from ..errors import DamagedDatabase, StoreError

MIGRATIONS: tuple[str, ...] = (
    # 1: users, keys, policy, audit
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    INSERT INTO meta (key, value) VALUES ('policy_version', '0');

    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,          -- JSON: groups, allow, deny, expires
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    ) STRICT;

    CREATE TABLE user_keys (
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        fingerprint TEXT NOT NULL,         -- SHA256:...
        key_type TEXT NOT NULL,
        public_key TEXT NOT NULL,          -- OpenSSH one-line form without comment
        comment TEXT NOT NULL,
        added_at TEXT NOT NULL,
        PRIMARY KEY (user, fingerprint)
    ) STRICT;

    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,          -- JSON: allow, deny
        updated_at TEXT NOT NULL
    ) STRICT;

    CREATE TABLE auth (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        user TEXT NOT NULL,
        client_ip TEXT NOT NULL,
        client_port INTEGER NOT NULL,
        method TEXT NOT NULL,
        key_fingerprint TEXT,
        result TEXT NOT NULL CHECK (result IN ('success', 'failure')),
        reason TEXT NOT NULL
    ) STRICT;
    CREATE INDEX auth_time ON auth (time);
    CREATE INDEX auth_user_time ON auth (user, time);

    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        client_ip TEXT NOT NULL,
        client_port INTEGER NOT NULL,
        key_fingerprint TEXT NOT NULL,
        client_version TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        end_reason TEXT,
        bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE INDEX sessions_started ON sessions (started_at);
    CREATE INDEX sessions_user_started ON sessions (user, started_at);
    CREATE INDEX sessions_open ON sessions (ended_at) WHERE ended_at IS NULL;

    CREATE TABLE channels (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        user TEXT NOT NULL,
        kind TEXT NOT NULL,
        target_host TEXT NOT NULL,
        target_ip TEXT,
        target_port INTEGER NOT NULL,
        decision TEXT NOT NULL CHECK (decision IN ('allow', 'deny')),
        rule TEXT,
        reason TEXT NOT NULL,
        opened_at TEXT NOT NULL,
        closed_at TEXT,
        bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE INDEX channels_opened ON channels (opened_at);
    CREATE INDEX channels_user_opened ON channels (user, opened_at);
    CREATE INDEX channels_session ON channels (session_id);
    CREATE INDEX channels_open ON channels (closed_at) WHERE closed_at IS NULL;
    """,
    # 2: audit (#3, #4): remote-forward listeners, forwarded-tcpip channel columns, an indexed sortable form
    # of target_ip for CIDR queries, indexes for the usual filters, and the hash-chained event log
    # (scheme in audit/chain.py and the README).
    """
    CREATE TABLE listeners (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        user TEXT NOT NULL,
        listen_host TEXT NOT NULL,
        listen_port INTEGER NOT NULL,      -- the port bound (the requested one if refused)
        requested_port INTEGER NOT NULL,   -- 0 asks for any port
        decision TEXT NOT NULL CHECK (decision IN ('allow', 'deny')),
        rule TEXT,
        reason TEXT NOT NULL,
        opened_at TEXT NOT NULL,
        closed_at TEXT,
        close_reason TEXT
    ) STRICT;
    CREATE INDEX listeners_opened ON listeners (opened_at);
    CREATE INDEX listeners_user_opened ON listeners (user, opened_at);
    CREATE INDEX listeners_session ON listeners (session_id);
    CREATE INDEX listeners_open ON listeners (closed_at) WHERE closed_at IS NULL;

    ALTER TABLE channels ADD COLUMN listener_id INTEGER;     -- forwarded-tcpip: the listener it came through
    ALTER TABLE channels ADD COLUMN peer_ip TEXT;            -- forwarded-tcpip: who connected to the listener
    ALTER TABLE channels ADD COLUMN peer_port INTEGER;
    ALTER TABLE channels ADD COLUMN target_ip_key TEXT;      -- target_ip as 32 hex digits (IPv4 mapped), sortable
    CREATE INDEX channels_target_ip ON channels (target_ip_key, opened_at);
    CREATE INDEX channels_target_host ON channels (target_host COLLATE NOCASE, opened_at);
    CREATE INDEX channels_denied ON channels (opened_at) WHERE decision = 'deny';
    CREATE INDEX channels_listener ON channels (listener_id) WHERE listener_id IS NOT NULL;
    CREATE INDEX auth_failures ON auth (time) WHERE result = 'failure';

    CREATE TABLE audit_events (
        seq INTEGER PRIMARY KEY,           -- 1, 2, 3, ... without gaps (a prune removes a prefix)
        time TEXT NOT NULL,                -- when it was written
        kind TEXT NOT NULL CHECK (kind IN ('insert', 'update', 'adopt', 'restate', 'anchor', 'alarm')),
        tbl TEXT NOT NULL,                 -- auth | sessions | channels | listeners | audit_events
        row_id ANY NOT NULL,               -- the row's id (TEXT for sessions, INTEGER otherwise)
        payload TEXT NOT NULL,             -- canonical JSON: the row's full state after the change
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL                 -- SHA-256, see audit/chain.py event_hash
    ) STRICT;
    CREATE INDEX audit_events_row ON audit_events (tbl, row_id, seq);
    """,
    # 3: why a channel closed when the bastion closed it (revoked, crash); NULL when a side simply hung up
    """
    ALTER TABLE channels ADD COLUMN close_reason TEXT;
    """,
    # 4 (#20): a key's authorized_keys options, and who added it: a policy apply removes only the keys that a
    # policy file added. Keys from before this migration count as added by hand, so no apply removes them.
    """
    ALTER TABLE user_keys ADD COLUMN options TEXT NOT NULL DEFAULT '{}';   -- JSON, policy/authorized_keys.py
    ALTER TABLE user_keys ADD COLUMN source TEXT NOT NULL DEFAULT 'cli'
        CHECK (source IN ('cli', 'import', 'policy'));
    """,
    # 5 (#21): trusted user certificate authorities, declared in the policy like groups (policy/file.py [cas.NAME])
    """
    CREATE TABLE cas (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,          -- JSON: keys, principals_as_groups, require_known_user
        updated_at TEXT NOT NULL
    ) STRICT;
    """,
    # 6 (#21): TOTP secrets (`user totp enroll`) and the last time step accepted, so a code is used once
    """
    CREATE TABLE totp (
        user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
        secret TEXT NOT NULL,              -- base32 (RFC 6238); never in the audit log or the log
        last_step INTEGER,                 -- the last time step accepted; NULL until the first login
        enrolled_at TEXT NOT NULL
    ) STRICT;
    """,
    # 7 (#21): the policy's [revoked] list, declared state like cas; and the certificate that logged in, on the
    # auth and session rows (NULL for a key login and for rows written before). A serial is a uint64: TEXT.
    """
    CREATE TABLE revoked (
        kind TEXT NOT NULL CHECK (kind IN ('serial', 'key_id', 'fingerprint')),
        ca TEXT NOT NULL DEFAULT '',       -- serials: the CA's name in the policy
        value TEXT NOT NULL,               -- serials "LOW-HIGH"; key ids and "SHA256:..." as written
        updated_at TEXT NOT NULL,
        PRIMARY KEY (kind, ca, value)
    ) STRICT;
    ALTER TABLE auth ADD COLUMN cert_key_id TEXT;
    ALTER TABLE auth ADD COLUMN cert_serial TEXT;          -- decimal
    ALTER TABLE auth ADD COLUMN cert_ca TEXT;              -- SHA256:... of the CA key
    ALTER TABLE auth ADD COLUMN cert_principals TEXT;      -- JSON array
    ALTER TABLE auth ADD COLUMN cert_valid_after TEXT;     -- ISO 8601 UTC
    ALTER TABLE auth ADD COLUMN cert_valid_before TEXT;    -- ISO 8601 UTC, or "forever"
    ALTER TABLE sessions ADD COLUMN cert_key_id TEXT;
    ALTER TABLE sessions ADD COLUMN cert_serial TEXT;
    ALTER TABLE sessions ADD COLUMN cert_ca TEXT;
    ALTER TABLE sessions ADD COLUMN cert_principals TEXT;
    ALTER TABLE sessions ADD COLUMN cert_valid_after TEXT;
    ALTER TABLE sessions ADD COLUMN cert_valid_before TEXT;
    CREATE INDEX auth_cert_serial ON auth (cert_serial) WHERE cert_serial IS NOT NULL;
    CREATE INDEX auth_cert_key_id ON auth (cert_key_id) WHERE cert_key_id IS NOT NULL;
    CREATE INDEX sessions_cert_serial ON sessions (cert_serial) WHERE cert_serial IS NOT NULL;
    CREATE INDEX sessions_cert_key_id ON sessions (cert_key_id) WHERE cert_key_id IS NOT NULL;
    """,
)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """One way to open the database: WAL, foreign keys, a busy timeout so writers never fail on a lock."""
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:  # SQLite reads the file's header here: garbage bytes show up now
        raise DamagedDatabase(f"{path}: cannot open database: {exc} (run `bastion doctor`)") from None
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open database: {exc}") from None
    return conn


def open_database(path: Path, *, readonly: bool = False) -> sqlite_utils.Database:
    if readonly and not path.exists():
        raise StoreError(f"{path}: no database here; run `bastion init` first")
    return sqlite_utils.Database(connect(path, readonly=readonly))


def migrate(db: sqlite_utils.Database) -> int:
    """Run the migrations not yet applied, each in its own transaction; returns the schema version."""
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database schema version {version} is newer than this bastion ({len(MIGRATIONS)}); upgrade bastion"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            db.conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
        return len(MIGRATIONS)
    except sqlite3.DatabaseError as exc:
        raise DamagedDatabase(f"{_name(db)}database is unreadable or corrupt: {exc} (run `bastion doctor`)") from None


def _name(db: sqlite_utils.Database) -> str:
    """'PATH: ' for a message about the database, when SQLite can still say which file it is."""
    try:
        path = db.execute("PRAGMA database_list").fetchone()[2]
    except sqlite3.Error:
        return ""
    return f"{path}: " if path else ""
