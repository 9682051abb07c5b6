"""`bastion backup DEST`: a consistent copy of the live database, taken while the server runs.

SQLite's online backup API copies the pages under a read transaction, so the copy is one moment of the
database even while the audit writer commits. The copy is written to a hidden temporary file next to
DEST (mode 0600: it holds users, keys and the audit log), switched to a single-file journal so DEST is
complete on its own, checked with `quick_check`, and only then linked into place; an existing DEST is
never overwritten.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .db import connect, utc_now
from .errors import StoreError


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size: int
    users: int
    audit_rows: int


def backup_name() -> str:
    """bastion-20250131T120000Z.db: sorts by time, one per second."""
    return f"bastion-{utc_now():%Y%m%dT%H%M%SZ}.db"


def backup_database(source: Path, dest: Path) -> BackupResult:
    """Copy `source` to `dest` (a new file, or a directory to put `backup_name()` in)."""
    if not source.exists():
        raise StoreError(f"{source}: no database to back up; run `bastion init` first")
    if dest.is_dir():
        dest = dest / backup_name()
    if dest.exists() or dest.is_symlink():
        raise StoreError(f"{dest} already exists; backups never overwrite, choose a new name")
    if not dest.parent.is_dir():
        raise StoreError(f"{dest.parent} is not a directory")
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise StoreError(f"{partial}: cannot create: {exc.strerror}") from None
    os.close(fd)
    try:
        result = _copy(source, partial)
        try:
            os.link(partial, dest)  # unlike rename, fails instead of replacing a DEST made meanwhile
        except FileExistsError:
            raise StoreError(f"{dest} already exists; backups never overwrite, choose a new name") from None
        except OSError as exc:
            raise StoreError(f"{dest}: cannot create: {exc.strerror}") from None
        _fsync_directory(dest.parent)
        return BackupResult(dest, result.size, result.users, result.audit_rows)
    finally:
        partial.unlink(missing_ok=True)


def _copy(source: Path, target: Path) -> BackupResult:
    live = connect(source, readonly=True)
    copy = sqlite3.connect(target)
    try:
        try:
            live.backup(copy)
            # The live database is in WAL mode; the backup is one self-contained file.
            copy.execute("PRAGMA journal_mode = DELETE")
            check = copy.execute("PRAGMA quick_check").fetchone()[0]
            users = copy.execute("SELECT count(*) FROM users").fetchone()[0]
            audit_rows = sum(
                copy.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("auth", "sessions", "channels")
            )
        except sqlite3.Error as exc:
            raise StoreError(f"backup of {source} failed: {exc}") from None
        if check != "ok":
            raise StoreError(f"backup of {source} failed its integrity check: {check}")
    finally:
        copy.close()
        live.close()
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())
    return BackupResult(target, target.stat().st_size, users, audit_rows)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
