"""The fleet's audit trail for tests (#22): a fresh database on the run's throwaway cluster (testbed/postgres.py)
with the trail's schema migrated, as `bastion store migrate` does before nodes with `audit_ship_to` ship to it
(a shipper never creates it). Without root or PostgreSQL the tests that use it skip with postgres.py's reason.

    from testbed.pg_trail import pg_trail_url, pg_url, postgres  # noqa: F401  (fixtures)
"""

from __future__ import annotations

from testbed.postgres import pytest


def trail_migrated(url: str) -> str:
    """`url` with the audit trail's schema made (or brought up to date); returns it."""
    from bastion.audit import fleet

    conn = fleet.connect(url)
    try:
        fleet.migrate(conn)
    finally:
        conn.close()
    return url


if pytest is not None:  # bench/ runs without the test extra
    from testbed.postgres import pg_url, postgres  # noqa: F401  (fixtures, re-exported)

    @pytest.fixture
    def pg_trail_url(pg_url):  # type: ignore[no-untyped-def]
        """A postgresql:// URL of an empty, migrated audit trail."""
        return trail_migrated(pg_url)


