"""`bastion backup DEST`: a consistent, private, self-contained copy of the live database, taken while rows are
being written; never over an existing file; and the copy restores."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.ops.backup import backup_database
from bastion.cli.main import app
from bastion.store.schema import connect
from bastion.errors import StoreError
from bastion.store.sqlite import Store, parse_public_keys

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz alice@example"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    path = home / "bastion.db"
    store = Store(path)
    store.add_user("alice", parse_public_keys(KEY))
    store.close()
    return path


def insert_auth(conn: sqlite3.Connection, number: int) -> None:
    with conn:
        conn.execute("INSERT INTO auth (time, user, client_ip, client_port, method, key_fingerprint, result, reason) "
                     "VALUES ('2026-01-01T00:00:00.000Z', 'alice', '10.0.0.5', ?, 'publickey', NULL, 'success', "
                     "'key accepted')", [number])


def test_backup_while_rows_are_written_is_consistent_private_and_self_contained(database, tmp_path):
    # 1. a writer commits rows, one per transaction, the way the audit thread does
    writer = connect(database)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        while not stop.is_set():
            written[0] += 1
            insert_auth(writer, written[0])

    thread = threading.Thread(target=write)
    thread.start()
    try:
        while written[0] < 50:
            stop.wait(0.01)
        result = backup_database(database, tmp_path / "copy.db")
    finally:
        stop.set()
        thread.join(10)
        writer.close()

    # 2. the copy is one moment: rows 1..N with no gap, N at most what was written
    copy = sqlite3.connect(result.path)
    ports = [row[0] for row in copy.execute("SELECT client_port FROM auth ORDER BY id")]
    assert ports == list(range(1, len(ports) + 1)) and 50 <= len(ports) <= written[0]
    assert result.audit_rows == len(ports) and result.users == 1
    assert copy.execute("PRAGMA quick_check").fetchone()[0] == "ok"

    # 3. one private file: no -wal beside it, mode 0600, no leftovers in the directory
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    copy.close()
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "home"]


def test_backup_into_a_directory_never_overwrites_and_restores(database, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir()

    # 1. a directory gets a time-stamped name
    result = backup_database(database, backups)
    assert result.path.parent == backups and result.path.name.startswith("bastion-") and result.path.suffix == ".db"

    # 2. an existing file is never replaced
    before = result.path.read_bytes()
    with pytest.raises(StoreError, match="already exists; backups never overwrite"):
        backup_database(database, result.path)
    assert result.path.read_bytes() == before
    assert [p.name for p in backups.iterdir()] == [result.path.name]

    # 3. restore: the copy in place of the database, opened by the store as usual
    restored = tmp_path / "restored" / "bastion.db"
    restored.parent.mkdir()
    restored.write_bytes(result.path.read_bytes())
    store = Store(restored)
    try:
        assert [u["name"] for u in store.list_users()] == ["alice"]
    finally:
        store.close()


def test_backup_command(database, tmp_path):
    runner = CliRunner()
    home = database.parent
    result = runner.invoke(app, ["--home", str(home), "backup", str(tmp_path / "b.db")], env={"BASTION_HOME": None})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"backed up {database} to {tmp_path / 'b.db'} (") and "1 users" in result.stdout

    result = runner.invoke(app, ["--home", str(tmp_path / "empty"), "backup", str(tmp_path / "c.db")],
                           env={"BASTION_HOME": None})
    assert isinstance(result.exception, StoreError) and "no database to back up" in str(result.exception)
