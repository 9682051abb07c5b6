"""A throwaway PostgreSQL cluster for tests (#22; /work/shared/TESTBED.md, "PostgreSQL").

PostgreSQL refuses to run as root, so the cluster belongs to the package's unprivileged `postgres` user: its
directory is made and chowned here, `initdb -A trust` and `pg_ctl start` run through `runuser -u postgres --`.
It listens on a unix socket in its directory and on 127.0.0.1 at a free port (loopback only). `stop()` and
`start()` take it down and bring it back (outage tests); `close()` stops it and removes the directory.

    with Postgres.create(tmp) as pg:
        url = pg.new_database("t1")      # postgresql://postgres@127.0.0.1:PORT/t1

Or inside a database host's network namespace (testbed/fleet.py), listening on that host's address, port 5432:
`initdb`, `pg_ctl start` and `pg_ctl stop` run as `ip netns exec NS runuser -u postgres -- …`, so the server is
in that namespace and only the hosts on its bridge reach it. `url()` is what they use; the test process itself
(in no namespace of the fleet) reaches it through the unix socket in its directory (`local_url()`).

    pg = Postgres.create(netns="bt-db-XXXX", address="10.98.0.20")   # in /tmp: postgres must reach it
    pg.url("t1")          # postgresql://postgres@10.98.0.20:5432/t1, for the nodes
    pg.local_url("t1")    # the same database through the socket, for the test

Without root or without the binaries, `unavailable()` says why (the tests skip with that reason).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "postgres"


def bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (Debian's layout), or PATH's."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                            reverse=True):
        if os.access(f"{candidate}/initdb", os.X_OK) and os.access(f"{candidate}/pg_ctl", os.X_OK):
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def unavailable() -> str | None:
    """Why a throwaway cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root, to run PostgreSQL as the unprivileged postgres user (runuser)"
    if bin_dir() is None:
        return "needs PostgreSQL's initdb and pg_ctl (Debian: apt-get install postgresql)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return "needs the postgres system user (Debian's postgresql package creates it)"
    if shutil.which("runuser") is None:
        return "needs runuser (util-linux)"
    if importlib.util.find_spec("psycopg") is None:
        return "needs psycopg 3 (pip install -e '.[test]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One cluster; `url(db)` for clients, `new_database(name)` for a fresh database per test."""

    def __init__(self, root: Path, port: int, netns: str | None = None, address: str = "127.0.0.1") -> None:
        self.root = root  # owned by postgres: data/ and the socket
        self.data = root / "data"
        self.port = port
        self.netns = netns  # None: this machine's own network (loopback)
        self.address = address
        self.bin = bin_dir()
        self.log = root / "server.log"

    @classmethod
    def create(cls, parent: Path | None = None, *, netns: str | None = None,
               address: str | None = None) -> "Postgres":
        """A new cluster, started. With `netns` (and that namespace's `address`), it runs inside it on port 5432
        (the namespace is the cluster's alone); else on 127.0.0.1 at a free port."""
        if (netns is None) != (address is None):
            raise ValueError("netns and address go together")
        entry = pwd.getpwnam(USER)
        root = Path(tempfile.mkdtemp(prefix="bt-pg-", dir=parent))
        os.chmod(root, 0o700)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        pg = cls(root, 5432, netns, address) if netns else cls(root, free_port())
        pg._as_postgres(["initdb", "-D", str(pg.data), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8",
                         "--locale=C"])
        if netns:  # the hosts on its bridge: trust, as on the socket (a sealed network of the test's own)
            with (pg.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet trust\n")
        pg.start()
        return pg

    def _as_postgres(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        assert self.bin is not None
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        return subprocess.run([*inside, "runuser", "-u", USER, "--", str(self.bin / argv[0]), *argv[1:]], cwd="/",
                              capture_output=True, text=True, timeout=60, check=check)

    def start(self) -> None:
        options = (f"-c listen_addresses={self.address} -p {self.port} -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        done = self._as_postgres(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t",
                                  "30", "start"], check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m MODE` (fast: clients are disconnected; immediate: as a crash would)."""
        self._as_postgres(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"], check=False)

    def running(self) -> bool:
        return self._as_postgres(["pg_ctl", "-D", str(self.data), "status"], check=False).returncode == 0

    def url(self, database: str = "postgres") -> str:
        """What clients use: TCP to its address (inside a namespace, from the hosts on its bridge)."""
        return f"postgresql://{USER}@{self.address}:{self.port}/{database}"

    def local_url(self, database: str = "postgres") -> str:
        """For this process: the unix socket in the cluster's directory (reachable from any namespace); the
        same as url() for a cluster on loopback."""
        if self.netns is None:
            return self.url(database)
        return f"postgresql://{USER}@/{database}?host={self.root}&port={self.port}"

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.local_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, database: str, statement: str, params: tuple = ()) -> list[tuple]:
        """Run one statement as the superuser and return its rows (for a test's look or its tampering)."""
        import psycopg

        with psycopg.connect(self.local_url(database), autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        try:
            if self.data.exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate, timeout: float = 30, step: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns something true; that value, or AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {predicate}")
        time.sleep(step)


# ---- pytest fixtures: `from testbed.postgres import postgres, pg_url  # noqa: F401` in a test module ----------

try:
    import pytest
except ImportError:  # bench/ without the test extra
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def postgres():  # type: ignore[no-untyped-def]
        """One throwaway cluster for the whole run (startup takes a second or two); skipped with the reason."""
        reason = unavailable()
        if reason:
            pytest.skip(reason)
        cluster = Postgres.create()
        try:
            yield cluster
        finally:
            cluster.close()

    @pytest.fixture
    def pg_url(postgres, request):  # type: ignore[no-untyped-def]
        """A fresh database per test on the session's cluster (started again if a test left it stopped)."""
        if not postgres.running():
            postgres.start()
        name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:40] + "_" + os.urandom(3).hex()
        return postgres.new_database(name.lower())
