"""A PostgreSQL store for tests (#22): a fresh database on the run's throwaway cluster (testbed/postgres.py,
shared with the audit-shipping tests), its store schema migrated. Without root or PostgreSQL the tests that use
it skip with postgres.py's reason.

    from testbed.pg_store import pg_store_url, pg_url, postgres  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import pytest

from testbed.postgres import Postgres, pg_url, postgres  # noqa: F401  (fixtures, re-exported)


def migrated(url: str) -> str:
    from bastion.store import pg_schema
    from bastion.store.dialect import connect

    conn = connect(url)
    try:
        pg_schema.migrate(conn)
    finally:
        conn.close()
    return url


@pytest.fixture
def pg_store_url(pg_url):  # type: ignore[no-untyped-def]
    """A postgresql:// URL of an empty, migrated store."""
    return migrated(pg_url)


def backend_location(request, tmp_path):  # type: ignore[no-untyped-def]
    """For a fixture parametrized over ("sqlite", "postgresql"): the SQLite file, or a migrated PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "bastion.db"
    return request.getfixturevalue("pg_store_url")


__all__ = ["Postgres", "backend_location", "migrated", "pg_store_url", "pg_url", "postgres"]
