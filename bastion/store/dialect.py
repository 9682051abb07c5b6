"""The one seam between the store's SQL and its database (#22): the same `Store` methods run on the embedded
SQLite file or on a shared PostgreSQL, through a small adapter that knows

- the placeholder style (the store writes `?`; psycopg wants `%s`, so a literal `%` is doubled),
- how a transaction is opened and how a connection is (re)made,
- what a row number is called (SQLite's `rowid`; PostgreSQL's tables have an `id` column for it),
- how the other nodes learn of a change (PostgreSQL: `NOTIFY bastion_changes, '<version>'` in the
  transaction that made it; SQLite: nothing, the single node reads its own file).

Every SQL statement of the store is written once, in the common subset: ON CONFLICT upserts, plain
SELECT/INSERT/UPDATE/DELETE, RETURNING, and `"user"` quoted (a reserved word in PostgreSQL).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import StoreError

CHANNEL = "bastion_changes"  # LISTEN/NOTIFY channel; the payload is the new policy version


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for every message and log line."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class SqliteDatabase:
    """sqlite_utils underneath, as the store always had it."""

    dialect = "sqlite"
    rowid = "rowid"

    def __init__(self, path: Path):
        from .schema import open_database

        self.db = open_database(path)
        self.where = str(path)

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        import sqlite3

        return (sqlite3.Error,)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.db.execute(sql, list(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.db.conn.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        return list(self.db.query(sql, list(params)))

    def transaction(self) -> Any:
        return self.db.conn  # commits on success, rolls back on an exception

    def read_transaction(self) -> Any:
        return self.db.conn

    def notify(self, version: int) -> None:
        """One node reads its own file: nobody to tell."""

    def close(self) -> None:
        self.db.conn.close()


class PostgresDatabase:
    """One psycopg 3 connection in autocommit mode; `transaction()` is a real BEGIN … COMMIT. A connection lost
    (the server restarted, the network) is made again at the next transaction or statement outside one."""

    dialect = "postgresql"
    rowid = "id"

    def __init__(self, url: str, *, connect_timeout: float = 5.0, statement_timeout_ms: int = 0):
        if importlib.util.find_spec("psycopg") is None:
            raise StoreError("a PostgreSQL store needs psycopg 3: pip install 'bastion[fleet]'")
        self.url = url
        self.where = redact(url)
        self._timeout = connect_timeout
        self._statement_timeout = statement_timeout_ms
        self._conn: Any = None
        self._depth = 0
        self._mutex = threading.RLock()  # psycopg serializes too; this keeps a transaction's statements together
        self._connect()

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)

    def _connect(self) -> Any:
        self._conn = connect(self.url, timeout=self._timeout, statement_timeout_ms=self._statement_timeout)
        return self._conn

    def _live(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._depth:
                raise StoreError(f"{self.where}: connection lost inside a transaction")
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._connect()
        return self._conn

    @staticmethod
    def _sql(sql: str) -> str:
        return _translate(sql)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        import psycopg

        with self._mutex:
            try:
                return self._live().execute(self._sql(sql), list(params))
            except psycopg.OperationalError as exc:
                raise StoreError(f"{self.where}: {first_line(exc)}") from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        import psycopg

        with self._mutex:
            try:
                with self._live().cursor() as cursor:
                    cursor.executemany(self._sql(sql), [list(row) for row in rows])
            except psycopg.OperationalError as exc:
                raise StoreError(f"{self.where}: {first_line(exc)}") from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        cursor = self.execute(sql, params)
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    @contextlib.contextmanager
    def transaction(self, isolation: str = "") -> Iterator[Any]:
        import psycopg

        with self._mutex:
            try:
                conn = self._live()
                self._depth += 1
                try:
                    with conn.transaction():
                        if isolation:
                            conn.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
                        yield conn
                finally:
                    self._depth -= 1
            except psycopg.OperationalError as exc:
                raise StoreError(f"{self.where}: {first_line(exc)}") from None

    def read_transaction(self) -> Any:
        """Several reads that must agree (a policy and its version, a node's whole snapshot)."""
        return self.transaction("REPEATABLE READ READ ONLY")

    def notify(self, version: int) -> None:
        """Delivered to every listening node when the enclosing transaction commits, never before."""
        self.execute("SELECT pg_notify(?, ?)", [CHANNEL, str(version)])

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()


_translated: dict[str, str] = {}


def _translate(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (the store's SQL has no `?` inside a string literal)."""
    done = _translated.get(sql)
    if done is None:
        done = _translated[sql] = sql.replace("%", "%%").replace("?", "%s")
    return done


def connect(url: str, *, timeout: float = 5.0, statement_timeout_ms: int = 0, autocommit: bool = True) -> Any:
    """A psycopg connection that notices a dead peer within seconds (TCP keepalives, tcp_user_timeout); the
    error names the URL without its password. libpq's own ways to give one work: PGPASSFILE / ~/.pgpass,
    PGPASSWORD, a service file."""
    import psycopg

    options = {}
    if statement_timeout_ms:
        options["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=max(1, int(timeout)),
                               application_name="bastion", keepalives=1, keepalives_idle=5,
                               keepalives_interval=2, keepalives_count=2, tcp_user_timeout=int(timeout * 1000),
                               **options)
    except psycopg.Error as exc:
        raise StoreError(f"{redact(url)}: cannot connect: {first_line(exc)}") from None
