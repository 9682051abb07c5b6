"""Checkpoint a WAL database from a thread of its own, so that commits do not wait for a checkpoint's fsyncs.

SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past `wal_autocheckpoint` pages: that
COMMIT copies the WAL back into the database and fsyncs both files before it returns. For the audit writer, that
is every channel open of the batch waiting on a disk flush. Here the writer checkpoints itself only past a
backstop (see BACKSTOP_PAGES), and this thread runs PASSIVE checkpoints, which wait for no lock and
block neither the writer nor readers: when the writer has committed `every_rows` changes since the last one, and
every `idle_seconds` while anything is left.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from ..errors import StoreError
from ..store.schema import connect

log = logging.getLogger("bastion.audit")

# The writer's own automatic checkpoint, in pages (8 MB with 4 KiB pages; SQLite's default is 1,000). Under a
# steady stream of commits a PASSIVE checkpoint never quite catches up (more frames land while it syncs), and
# the WAL only starts over once every frame is in the database: past this size the writer's COMMIT copies the
# few frames left, which this thread has not, and the WAL restarts. With 10,000 it grew to 40 MB at 16 opens at
# a time and the commit p99 was no better.
BACKSTOP_PAGES = 2_000


class Checkpointer:
    """Owned by one writer: `start(writer)`, `wrote(n)` after each commit (writer thread only), `stop()`."""

    def __init__(self, path: Path, every_rows: int = 100, idle_seconds: float = 5.0,
                 backstop_pages: int = BACKSTOP_PAGES):
        self.path = path
        self.backstop_pages = backstop_pages
        self.every_rows = every_rows  # about 10 WAL pages a row here: near SQLite's default of 1,000 pages
        self.idle_seconds = idle_seconds
        self.checkpoints = 0  # completed; for tests
        self._due = threading.Event()
        self._stopping = False
        self._dirty = False  # something committed since the last checkpoint began
        self._rows = 0  # committed since the last wake-up; touched only by the writer thread
        self._thread: threading.Thread | None = None

    def start(self, writer: sqlite3.Connection) -> None:
        writer.execute(f"PRAGMA wal_autocheckpoint = {int(self.backstop_pages)}")
        self._stopping = False  # a writer may be started again after a stop
        self._due.clear()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint", daemon=True)
        self._thread.start()

    def wrote(self, rows: int) -> None:
        self._dirty = True
        self._rows += rows
        if self._rows >= self.every_rows:
            self._rows = 0
            self._due.set()

    def stop(self) -> None:
        """Stop the thread; what is still in the WAL is durable and is checkpointed by the next one, or on close."""
        if self._thread is None:
            return
        self._stopping = True
        self._due.set()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        try:
            conn = connect(self.path)
        except StoreError as exc:  # the writer's own checkpoint (the backstop) still bounds the WAL
            log.warning("audit checkpoints left to the writer, every %d pages: %s", self.backstop_pages, exc)
            return
        failing = False
        try:
            while True:
                self._due.wait(self.idle_seconds)
                self._due.clear()
                if self._stopping:
                    return
                if not self._dirty:
                    continue
                self._dirty = False  # before the checkpoint: a commit during it makes the next one due
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # another process checkpointing, disk trouble: try again next time
                    self._dirty = True
                    if not failing:
                        log.warning("audit checkpoint failed, will retry: %s", exc)
                    failing = True
                    continue
                failing = False
                self.checkpoints += 1
        finally:
            conn.close()
