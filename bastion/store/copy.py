"""`bastion store copy` (#22): one store's whole state into another, in one transaction of the target — a single
node's SQLite into a fleet's PostgreSQL (or back). Users with their policy, keys with options and source, groups,
CAs, the [revoked] list, TOTP secrets with their last step, and the policy version (never lower than the
target's: every node sees a change). Into PostgreSQL also the home CA (#22, home_ca.py): the source home's
public key, where its private key is, and its last serial (never lowering the target's)."""

from __future__ import annotations

from ..errors import StoreError
from . import home_ca
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


def copy_store(source: Store, target: Store, *, force: bool = False, ca: home_ca.FleetCA | None = None) -> dict[str, int]:
    """Copy everything from `source` into `target`; refused when the target holds anything, unless `force`
    (then the target's rows are replaced). `ca`: the source home's CA as its files hold it (ops/ca.py `home_ca_of`), for a PostgreSQL target. Returns the rows
    copied per table, the new policy version and the target's last home CA serial."""
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
                fleet_ca = home_ca.row(dst, lock=True) if home_ca.applies(target) else None
                if fleet_ca is not None and fleet_ca.public_key is not None:
                    held["home CA"] = 1
                if any(held.values()):
                    if not force:
                        what = ", ".join(f"{n} {table}" for table, n in held.items() if n)
                        raise StoreError(f"{target.where} is not empty ({what}); `--force` replaces what it holds")
                    for table, _, _ in reversed(TABLES):
                        dst.execute(f"DELETE FROM {table}")
                    if fleet_ca is not None:  # its trust goes; its serials stay used
                        dst.execute("UPDATE home_ca SET public_key = NULL, fingerprint = NULL, key_home = NULL, "
                                    "created_at = NULL WHERE id = 1")
                for table, columns, _ in TABLES:
                    if rows[table]:
                        dst.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                                        f"VALUES ({', '.join('?' * len(columns))})", rows[table])
                last_serial = 0
                if fleet_ca is not None and ca is not None:
                    if ca.public_key is not None and ca.fingerprint is not None:
                        home_ca.publish(dst, ca.public_key, ca.fingerprint, ca.key_home, ca.last_serial)
                    else:
                        dst.execute("UPDATE home_ca SET last_serial = ? WHERE id = 1 AND last_serial < ?",
                                    [ca.last_serial, ca.last_serial])
                if fleet_ca is not None:
                    last_serial = home_ca.row(dst).last_serial
                current = int(dst.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()[0])
                new_version = max(version, current + 1)
                dst.execute("UPDATE meta SET value = ? WHERE key = 'policy_version'", [str(new_version)])
                dst.notify(new_version)
        except dst.errors as exc:
            raise StoreError(f"{target.where}: nothing copied: {exc}") from None
    return {**{table: len(found) for table, found in rows.items()}, "policy_version": new_version,
            "last_serial": last_serial}
