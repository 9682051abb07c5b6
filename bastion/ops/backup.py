"""`bastion backup DEST`: a consistent copy of the live database, taken while the server runs.

SQLite's online backup API copies the pages under a read transaction, so the copy is one moment of the
database even while the audit writer commits. The copy is written in a private temporary directory next to
DEST (SQLite opens files by name and makes a journal beside them; in a directory of our own nobody can plant
a link at either name), mode 0600 (it holds users, keys and the audit log), switched to a single-file
journal so DEST is complete on its own, checked with `quick_check`, and only then linked into place. An
existing DEST, a link included, is never overwritten or followed (safe_files); DEST `-` streams the copy to
standard output.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..audit.chain import AUDIT_TABLES, Progress
from ..clock import utc_now
from ..errors import StoreError
from ..safe_files import FileExists, copy_to_stdout, create_new, is_stdout, publish, staging_directory
from ..store.schema import connect


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size: int
    users: int
    audit_rows: int


def backup_name() -> str:
    """bastion-20250131T120000Z.db: sorts by time, one per second."""
    return f"bastion-{utc_now():%Y%m%dT%H%M%SZ}.db"


def backup_database(source: Path, dest: Path, progress: Progress | None = None) -> BackupResult:
    """Copy `source` to `dest`: a new file, a directory to put `backup_name()` in (a real one: a link to a
    directory is refused like any other link), or `-` for standard output."""
    if not source.exists():
        raise StoreError(f"{source}: no database to back up; run `bastion init` first")
    if is_stdout(dest):
        return _backup_to_stdout(source, progress)
    if dest.is_dir() and not dest.is_symlink():
        dest = dest / backup_name()
    if os.path.lexists(dest):
        raise StoreError(f"{dest} already exists; backups never overwrite, choose a new name")
    if not dest.parent.is_dir():
        raise StoreError(f"{dest.parent} is not a directory")
    try:
        with staging_directory(dest) as staging:
            staged = staging / dest.name
            os.close(create_new(staged))  # 0600 from the first byte; SQLite then writes into it
            result = _copy(source, staged, progress)
            publish(staged, dest)  # a link: fails instead of replacing a DEST made meanwhile
    except FileExists:
        raise StoreError(f"{dest} already exists; backups never overwrite, choose a new name") from None
    return BackupResult(dest, result.size, result.users, result.audit_rows)


def _backup_to_stdout(source: Path, progress: Progress | None) -> BackupResult:
    """The same checked copy, made in a private temporary directory in the home (the database's own filesystem,
    not a RAM-backed /tmp), then streamed to standard output."""
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=source.parent) as staging:
        staged = Path(staging) / "bastion.db"
        os.close(create_new(staged))
        result = _copy(source, staged, progress)
        copy_to_stdout(staged)
    return BackupResult(Path("-"), result.size, result.users, result.audit_rows)


_STEP_PAGES = 1024  # 4 MiB of 4 KiB pages per step of the copy, then a word to the progress bar


def _copy(source: Path, target: Path, progress: Progress | None = None) -> BackupResult:
    live = connect(source, readonly=True)
    live.isolation_level = None
    copy = sqlite3.connect(target)
    try:
        try:
            # One read transaction around the whole copy: it copies one snapshot in steps. Without it, each
            # commit of the server's audit writer between two steps would restart the copy from the first page.
            live.execute("BEGIN")
            live.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # the snapshot starts here
            if progress is None:
                live.backup(copy)
            else:
                live.backup(copy, pages=_STEP_PAGES,
                            progress=lambda _status, remaining, total: progress("copying", total - remaining, total))
                progress("checking", 0, None)
            live.execute("COMMIT")
            # The live database is in WAL mode; the backup is one self-contained file.
            copy.execute("PRAGMA journal_mode = DELETE")
            check = copy.execute("PRAGMA quick_check").fetchone()[0]
            users = copy.execute("SELECT count(*) FROM users").fetchone()[0]
            audit_rows = sum(
                copy.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in AUDIT_TABLES  # the chain's own list, so a new audit table is counted too
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
