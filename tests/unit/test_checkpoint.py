"""WAL checkpoints run on their own thread: commits do not checkpoint, and committed rows still reach the database
file while the writer runs."""

import asyncio
import contextlib
import shutil
import sqlite3
import time
from datetime import UTC, datetime

from bastion.audit.writer import AuditLog, ChannelRecord, SessionRecord
from bastion.audit.checkpoint import Checkpointer
from bastion.store.schema import connect
from bastion.store.sqlite import Store


def rows_in_database_file(path, table):
    """Rows in the main database file alone, without its WAL: what checkpoints have copied there."""
    copy = path.with_name(path.name + ".copy")
    shutil.copyfile(path, copy)  # no -wal beside the copy: SQLite reads only what was checkpointed
    conn = sqlite3.connect(copy)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.DatabaseError:  # the table itself is still only in the WAL, or a page is mid-copy
        return 0
    finally:
        conn.close()
        copy.unlink()


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def checkpointed_writer(tmp_path, **options):
    """A database with a table t, a writer on it that commits every statement, and a started Checkpointer."""
    path = tmp_path / "t.db"
    writer = connect(path)
    writer.isolation_level = None
    writer.execute("CREATE TABLE t (x BLOB)")
    checkpointer = Checkpointer(path, **options)
    checkpointer.start(writer)
    try:
        yield path, writer, checkpointer
    finally:
        checkpointer.stop()
        writer.close()


def test_commits_leave_the_checkpoint_to_the_checkpointer(tmp_path):
    # asked for nothing yet, and a backstop out of reach
    with checkpointed_writer(tmp_path, every_rows=10**9, idle_seconds=3600, backstop_pages=10**6) as (
            path, writer, checkpointer):
        thread = checkpointer._thread
        for _ in range(3000):  # about 3,000 WAL pages: SQLite's own default would have checkpointed at 1,000
            writer.execute("INSERT INTO t VALUES (?)", [b"x" * 1000])
        assert rows_in_database_file(path, "t") == 0
        assert checkpointer.checkpoints == 0

        checkpointer.every_rows = 1
        checkpointer.wrote(1)
        # the rows reach the file inside the checkpoint, the count goes up after it returns: wait for both
        wait_for(lambda: rows_in_database_file(path, "t") == 3000 and checkpointer.checkpoints >= 1)
        assert checkpointer.checkpoints == 1
    assert thread is not None and not thread.is_alive()  # stop() ends the thread


def test_the_backstop_bounds_the_wal_when_no_checkpoint_comes(tmp_path):
    with checkpointed_writer(tmp_path, every_rows=10**9, idle_seconds=3600, backstop_pages=200) as (
            path, writer, checkpointer):
        for _ in range(3000):
            writer.execute("INSERT INTO t VALUES (?)", [b"x" * 1000])
        page = writer.execute("PRAGMA page_size").fetchone()[0]
        wal_pages = (path.parent / (path.name + "-wal")).stat().st_size // (page + 24)
        assert wal_pages < 400  # started over each time it passed 200 pages, instead of growing to ~3,000
        assert rows_in_database_file(path, "t") > 2000  # the writer's own checkpoints put them there
        assert checkpointer.checkpoints == 0


def test_an_idle_writer_is_checkpointed_too(tmp_path):
    with checkpointed_writer(tmp_path, every_rows=10**9, idle_seconds=0.1) as (path, writer, checkpointer):
        writer.execute("INSERT INTO t VALUES (1)")
        checkpointer.wrote(1)  # far below every_rows: only the idle timer can take it to the file
        wait_for(lambda: rows_in_database_file(path, "t") == 1)
        done = checkpointer.checkpoints
        time.sleep(0.5)
        assert checkpointer.checkpoints == done  # nothing new written, nothing to do


def test_audit_rows_reach_the_database_file_while_the_writer_runs(tmp_path):
    path = tmp_path / "bastion.db"
    Store(path).close()

    async def scenario():
        audit = AuditLog(path)
        audit.start()
        try:
            await audit.open_session(SessionRecord(id="s1", user="alice", client_ip="127.0.0.1", client_port=5000,
                                                   key_fingerprint="SHA256:x", client_version="SSH-2.0-test",
                                                   started_at=datetime.now(UTC)))
            for _ in range(120):  # about 1,300 WAL pages: under the writer's own backstop of 2,000
                await audit.record_channel(ChannelRecord(
                    session_id="s1", user="alice", kind="direct-tcpip", target_host="db", target_ip="10.0.0.5",
                    target_port=5432, decision="allow", rule="r", reason="granted", opened_at=datetime.now(UTC)))
            # the writer asks for a checkpoint every 100 rows; 3 s is well before the 5 s idle timer would
            await asyncio.to_thread(wait_for, lambda: rows_in_database_file(path, "channels") >= 90, 3.0)
        finally:
            audit.stop()

    asyncio.run(scenario())
