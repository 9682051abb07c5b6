"""`bastion store copy` (#22): one store's whole state into another, in one transaction of the target — a single
node's SQLite into a fleet's PostgreSQL (or back). Users with their policy, keys with options and source, groups,
CAs, the [revoked] list, TOTP secrets with their last step, and the policy version (never lower than the
target's: every node sees a change)."""

from __future__ import annotations

from ..errors import StoreError
from .sqlite import Store

# (table, its columns, the order rows are read in); parents before children
TABLES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("users", ("name", "definition", "created_at", "updated_at"), "name"),
    ("user_keys", ('"user"', "fingerprint", "key_type", "public_key", "comment", "added_at", "options", "source"),
     "added_at"),
    ("groups", ("name", "definition", "updated_at"), "name"),
    ("cas", ("name", "definition", "updated_at"), "name"),
    ("totp", ('"user"', "secret", "last_step", "enrolled_at"), '"user"'),
    ("revoked", ("kind", "ca", "value", "updated_at"), "ROWID"),
)


def counts(store: Store) -> dict[str, int]:
    """How many rows each table holds (what a copy would move, or replace)."""
    db = store._db
    with store._lock:
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table, _, _ in TABLES}


def copy_store(source: Store, target: Store, *, force: bool = False) -> dict[str, int]:
    """Copy everything from `source` into `target`; refused when the target holds anything, unless `force`
    (then the target's rows are replaced). Returns the rows copied per table, and the new policy version."""
    src, dst = source._db, target._db
    rows: dict[str, list[tuple]] = {}
    with source._lock, src.read_transaction():
        for table, columns, order in TABLES:
            order = src.rowid if order == "ROWID" else order
            rows[table] = [tuple(row) for row in
                           src.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()]
        version = int(src.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])
    with target._lock:
        try:
            with dst.transaction():
                held = {table: dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table, _, _ in TABLES}
                if any(held.values()):
                    if not force:
                        what = ", ".join(f"{n} {table}" for table, n in held.items() if n)
                        raise StoreError(f"{target.where} is not empty ({what}); `--force` replaces what it holds")
                    for table, _, _ in reversed(TABLES):
                        dst.execute(f"DELETE FROM {table}")
                for table, columns, _ in TABLES:
                    if rows[table]:
                        dst.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                                        f"VALUES ({', '.join('?' * len(columns))})", rows[table])
                current = int(dst.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])
                new_version = max(version, current + 1)
                dst.execute("UPDATE meta SET value = ? WHERE key = 'policy_version'", [str(new_version)])
                dst.notify(new_version)
        except dst.errors as exc:
            raise StoreError(f"{target.where}: nothing copied: {exc}") from None
    return {**{table: len(found) for table, found in rows.items()}, "policy_version": new_version}
