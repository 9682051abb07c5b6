"""The fleet's audit trail (#22 part 3) without a server: a filled local log (bench/audit_queries.py's fill, a valid
chain) shipped by the real Shipper thread to a real throwaway PostgreSQL. Every filter of `bastion audit` finds the
same rows there as in SQLite; a shipper stopped mid-backlog resumes where PostgreSQL says; a second chain under
the same node id is an alarm, never an overwrite; `audit prune` keeps what was not shipped."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.audit import fleet
from bastion.audit.query import COLUMNS, make_filters, open_reader, select, stats
from bastion.audit.shipper import Shipper
from bastion.cli.main import app
from bastion.clock import utc_now
from bench.audit_queries import fill, sample_of
from testbed.pg_trail import pg_trail_url, pg_url, postgres  # noqa: F401 (fixtures)
from testbed.postgres import wait_until


def local_events(database: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq").fetchall()
    finally:
        conn.close()


def shipped(url: str, node: str) -> list[tuple[int, str]]:
    conn = fleet.connect(url)
    try:
        if fleet.schema_version(conn) == 0:
            return []
        return [tuple(r) for r in conn.execute("SELECT seq, hash FROM audit_events WHERE node = %s ORDER BY seq",
                                               [node])]
    finally:
        conn.close()


def ship_all(database: Path, url: str, node: str, **options) -> Shipper:
    shipper = Shipper(database, url, node, **options)
    shipper.start()
    try:
        expected = local_events(database)
        wait_until(lambda: shipper.shipped.seq == expected[-1][0], timeout=120)
    finally:
        shipper.stop()
    return shipper


@pytest.fixture
def filled(tmp_path) -> Path:
    database = tmp_path / "bastion.db"
    fill(database, sessions=1500, channels=6000, days=14, now=utc_now())
    return database


def test_every_filter_finds_the_same_rows_as_sqlite(filled, pg_trail_url):  # noqa: F811
    began = time.monotonic()
    ship_all(filled, pg_trail_url, "n1", batch=1000)
    events = len(local_events(filled))
    print(f"shipped {events} events in {time.monotonic() - began:.2f}s")
    assert shipped(pg_trail_url, "n1") == local_events(filled)
    sample = sample_of(filled)
    user, host, net24, net16, name, sid = (sample[k] for k in ("user", "host", "net24", "net16", "name", "session"))
    shapes = [
        ("channels", {"user": user, "since": "1d"}), ("channels", {"user": user, "since": "7d"}),
        ("channels", {"target": host, "since": "7d"}), ("channels", {"target": net24}),
        ("channels", {"target": f"{net16}:22", "since": "3d"}), ("channels", {"target": "10.0.0.0/8", "since": "1h"}),
        ("channels", {"target": name.upper()}), ("channels", {"target": "*.corp.internal:5432", "since": "2d"}),
        ("channels", {"target": "HOST1*.corp.internal"}), ("channels", {"denied": True, "since": "7d"}),
        ("channels", {"session": sid}), ("channels", {"limit": 100}),
        ("channels", {"client": "203.0.113.0/24", "since": "1d"}), ("channels", {"client": "10.8.0.0/16",
                                                                                 "until": "12h", "since": "3d"}),
        ("sessions", {"user": user, "since": "7d"}), ("sessions", {"denied": True, "since": "2d"}),
        ("sessions", {"target": host, "since": "7d"}), ("sessions", {"target": net16}),
        ("sessions", {"client": "203.0.113.0/24", "since": "1d"}), ("sessions", {"limit": 7}),
        ("auth", {"denied": True, "since": "1d"}), ("auth", {"user": user, "since": "7d"}),
        ("auth", {"client": "10.8.1.0/24"}), ("listeners", {"user": user}), ("listeners", {"denied": True}),
        ("listeners", {"target": "127.0.0.1"}), ("listeners", {"session": sid}), ("listeners", {"client": "::/0"}),
    ]
    local = open_reader(filled)
    conn = fleet.open_store(pg_trail_url)
    now = utc_now()
    try:
        for table, spelled in shapes:
            filters = make_filters(now=now, **spelled)
            expected = list(select(local, table, filters))
            found = list(fleet.select(conn, table, filters, COLUMNS[table]))
            assert {row.pop("node") for row in found} <= {"n1"}
            assert found == expected, (table, spelled, len(found), len(expected))
            assert list(fleet.select(conn, table, filters, COLUMNS[table], node="n2")) == []
        assert sum(1 for _ in select(local, "channels", make_filters(now=now, target=net24))) > 0
        for days, top in ((1, 3), (7, 10), (30, 1000)):  # audit stats: the same queries, the same summary
            assert stats(fleet.SqliteSpeaking(conn), now - timedelta(days=days), None, top) == stats(
                local, now - timedelta(days=days), None, top)
        assert stats(fleet.SqliteSpeaking(conn), now - timedelta(days=7), now - timedelta(days=2), 5) == stats(
            local, now - timedelta(days=7), now - timedelta(days=2), 5)
    finally:
        local.close()
        conn.close()


def test_a_shipper_stopped_mid_backlog_resumes(filled, pg_trail_url):  # noqa: F811
    expected = local_events(filled)
    first = Shipper(filled, pg_trail_url, "n1", batch=100, poll=0.05)
    first.start()
    wait_until(lambda: first.shipped.seq >= 500)
    first.stop()
    partial = shipped(pg_trail_url, "n1")
    assert 500 <= len(partial) < len(expected) and partial == expected[:len(partial)]
    second = ship_all(filled, pg_trail_url, "n1", batch=100)
    assert second.last_error is None
    assert shipped(pg_trail_url, "n1") == expected  # nothing lost, nothing twice
    conn = fleet.open_store(pg_trail_url)
    try:
        report = fleet.verify(conn)
    finally:
        conn.close()
    assert report.intact, report.as_dict()
    assert report.nodes["n1"].events == len(expected) and report.nodes["n1"].rows > 7500


def test_two_chains_under_one_node_id_are_an_alarm_not_an_overwrite(filled, pg_trail_url, tmp_path):  # noqa: F811
    ship_all(filled, pg_trail_url, "n1")
    before = shipped(pg_trail_url, "n1")
    other = tmp_path / "other.db"
    fill(other, sessions=100, channels=300, days=1, now=utc_now(), seed=9)
    shipper = Shipper(other, pg_trail_url, "n1")
    shipper.start()
    try:
        wait_until(lambda: (shipper.last_error or "").startswith("ALARM"))
    finally:
        shipper.stop()
    assert "two nodes share this node_id" in shipper.last_error
    assert shipped(pg_trail_url, "n1") == before
    store = fleet.open_store(pg_trail_url)
    try:  # every node's `audit ship status` sees the alarm
        assert [r["reported_error"] for r in fleet.node_reports(store)][0].startswith("ALARM")
    finally:
        store.close()
    # the same batch sent straight: refused whole, nothing stored
    conn = fleet.connect(pg_trail_url)
    try:
        events = sqlite3.connect(other).execute("SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash FROM "
                                                "audit_events ORDER BY seq LIMIT 50").fetchall()
        with pytest.raises(fleet.ShipAlarm, match="already in PostgreSQL with another hash"):
            fleet.ship_batch(conn, "n1", events)
        assert fleet.ship_batch(conn, "n1-other", events) == 50
        assert fleet.ship_batch(conn, "n1-other", events) == 0  # again: idempotent
    finally:
        conn.close()
    assert shipped(pg_trail_url, "n1") == before


def test_prune_keeps_the_events_not_yet_shipped(tmp_path, pg_trail_url):  # noqa: F811
    home = tmp_path / "home"
    runner = CliRunner()

    def bastion(*args: str):
        return runner.invoke(app, ["--home", str(home), *args], env={"BASTION_HOME": None})

    assert bastion("init", "--listen", "127.0.0.1:0").exit_code == 0
    config = home / "config.toml"
    config.write_text(config.read_text().replace('audit_ship_to = ""', f'audit_ship_to = "{pg_trail_url}"')
                      .replace('node_id = ""', 'node_id = "n1"'))
    database = home / "bastion.db"
    fill(database, sessions=300, channels=900, days=10, now=utc_now() - timedelta(days=2))
    events = local_events(database)
    conn = fleet.connect(pg_trail_url)
    try:
        rows = sqlite3.connect(database).execute(
            "SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash FROM audit_events WHERE seq <= 400 "
            "ORDER BY seq").fetchall()
        fleet.ship_batch(conn, "n1", rows)
    finally:
        conn.close()
    pruned = bastion("audit", "prune", "--older-than", "1d")
    assert pruned.exit_code == 0, pruned.output
    assert "keeping the events after seq 400: not yet shipped" in pruned.output
    remaining = local_events(database)
    assert remaining[0][0] > 400 and [e for e in remaining if e[0] <= len(events)] == events[400:]
    assert bastion("audit", "verify").exit_code == 0


def test_follow_store_follows_every_node_as_it_ships(tmp_path, pg_trail_url):  # noqa: F811
    from bastion.store.sqlite import Store
    from tests.integration.test_audit_cli import write_session

    databases = {}
    for name in ("n1", "n2"):
        databases[name] = tmp_path / f"{name}.db"
        Store(databases[name]).close()
        for number in range(3):
            write_session(databases[name], f"{name}-s{number}", "alice" if number else "bob")
    follower = subprocess.Popen(
        [sys.executable, "-m", "bastion", "--home", str(tmp_path / "nohome"), "audit", "follow", "--store", pg_trail_url,
         "--table", "sessions", "--user", "alice", "--jsonl", "--limit", "8", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # once it has looked (no node yet), every node it meets is followed from its first event; its start-up
        # takes seconds on a busy machine, so wait for its query to show in PostgreSQL rather than for a fixed time
        def has_looked() -> bool:
            import psycopg

            with psycopg.connect(pg_trail_url, autocommit=True) as conn:
                return bool(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                         "AND query LIKE 'SELECT node FROM audit_nodes%'").fetchone()[0])

        wait_until(has_looked, timeout=60)
        for name, database in databases.items():
            ship_all(database, pg_trail_url, name)
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert follower.returncode == 0 and len(events) == 8, err
    assert {(e["node"], e["row"]["id"], e["kind"]) for e in events} == {
        (node, f"{node}-s{n}", kind) for node in ("n1", "n2") for n in (1, 2) for kind in ("insert", "update")}


def test_store_migrate_takes_over_a_trail_an_earlier_shipper_made(filled, pg_url, tmp_path):  # noqa: F811
    """Before `store migrate` knew the trail, each shipper made it itself, in the same `schema_version`: an
    upgraded fleet's trail (here as a shipper of schema 2 left it, with events) is moved on, nothing lost."""
    conn = fleet.connect(pg_url)
    try:
        with conn.transaction():  # what an earlier shipper's migrate() did, up to its version 2
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for number in (1, 2):
                conn.execute(fleet.MIGRATIONS[number - 1])
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", [number])
        rows = sqlite3.connect(filled).execute("SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash FROM "
                                               "audit_events WHERE seq <= 300 ORDER BY seq").fetchall()
        assert fleet.ship_batch(conn, "n1", rows) == 300
    finally:
        conn.close()
    pg_trail_url = pg_url  # not migrated by the fixture: the earlier shipper made it
    with pytest.raises(fleet.FleetError, match=r"schema version 2 is old .* run `bastion store migrate`"):
        fleet.open_store(pg_trail_url)
    # a shipper finds it old: it says so and changes nothing; the events wait
    waiting = Shipper(filled, pg_trail_url, "n1", poll=0.05)
    waiting.start()
    try:
        wait_until(lambda: waiting.last_error)
    finally:
        waiting.stop()
    assert "run `bastion store migrate`" in waiting.last_error and waiting.shipped.seq == 0
    assert shipped(pg_trail_url, "n1") == local_events(filled)[:300]

    def migrate():
        return CliRunner().invoke(app, ["--home", str(tmp_path / "nohome"), "store", "migrate", "--audit-url",
                                        pg_trail_url], env={"BASTION_HOME": None})
    first = migrate()
    assert first.exit_code == 0, first.output
    assert first.output.strip().endswith(f"audit trail schema migrated from version 2 to {len(fleet.MIGRATIONS)}")
    assert shipped(pg_trail_url, "n1") == local_events(filled)[:300]  # nothing lost
    assert migrate().output.strip().endswith(f"audit trail schema version {len(fleet.MIGRATIONS)}, up to date")
    ship_all(filled, pg_trail_url, "n1")  # and shipping goes on where it was
    assert shipped(pg_trail_url, "n1") == local_events(filled)
    conn = fleet.open_store(pg_trail_url)
    try:
        assert fleet.verify(conn).intact
        assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")] == list(
            range(1, len(fleet.MIGRATIONS) + 1))
    finally:
        conn.close()


def test_store_migrate_makes_the_store_and_the_trail_of_the_config(tmp_path, postgres, pg_url):  # noqa: F811
    """`store` and `audit_ship_to` in one database, then in two: each schema with its own version table."""
    from bastion.store import pg_schema

    other = postgres.new_database(f"trail_{os.urandom(3).hex()}")
    for store, trail in ((pg_url, pg_url), (pg_url, other)):
        home = tmp_path / f"home-{trail.rsplit('/', 1)[1]}"
        runner = CliRunner()

        def bastion(*args: str):
            return runner.invoke(app, ["--home", str(home), *args], env={"BASTION_HOME": None})

        assert bastion("init", "--listen", "127.0.0.1:0").exit_code == 0
        config = home / "config.toml"
        config.write_text(re.sub(r'(?m)^store = ".*"$', f'store = "{store}"', config.read_text())
                          .replace('audit_ship_to = ""', f'audit_ship_to = "{trail}"'))
        done = bastion("store", "migrate")
        assert done.exit_code == 0, done.output
        lines = done.output.splitlines()
        assert len(lines) == 2, done.output
        assert lines[0].startswith(f"{store}: store schema") and lines[1].startswith(f"{trail}: audit trail schema")
        again = bastion("store", "migrate").output.splitlines()
        assert [line.rsplit(",", 1)[1].strip() for line in again] == ["up to date", "up to date"]
        for url in {store, trail}:
            conn = fleet.connect(url)
            try:
                assert fleet.schema_version(conn) == (len(fleet.MIGRATIONS) if url == trail else 0)
                assert pg_schema.schema_version(conn) == (len(pg_schema.MIGRATIONS) if url == store else 0)
            finally:
                conn.close()
        if store == trail:  # the next round needs an empty store again
            postgres.sql(store.rsplit("/", 1)[1], "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    plain = tmp_path / "plain"
    assert CliRunner().invoke(app, ["--home", str(plain), "init"], env={"BASTION_HOME": None}).exit_code == 0
    nothing = CliRunner().invoke(app, ["--home", str(plain), "store", "migrate"], env={"BASTION_HOME": None})
    assert nothing.exit_code == 0 and "nothing to do" in nothing.output


_EVENT_SQL = "SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash FROM audit_events ORDER BY seq"


def state_rows(url: str, node: str) -> dict[str, list[tuple]]:
    conn = fleet.connect(url)
    try:
        return {table: [tuple(r) for r in conn.execute(f"SELECT * FROM {table} WHERE node = %s ORDER BY id", [node])]
                for table in ("auth", "sessions", "channels", "listeners")}
    finally:
        conn.close()


def test_shipping_keeps_awkward_text_byte_for_byte(tmp_path, pg_trail_url):  # noqa: F811
    """The events and rows go to PostgreSQL through COPY's text format: a backslash, tab, newline, carriage
    return, quote, `\\.` or non-ASCII letter in a session id (a string row_id), a user name or a host must come
    out as written, in the event (whose hash covers it) and in the row the queries read."""
    from bastion.store.sqlite import Store
    from tests.integration.test_audit_cli import write_session

    database = tmp_path / "n1.db"
    Store(database).close()
    awkward = "a\\b\tc\nd\re\"f\\.g\\\\N é"
    write_session(database, f"s{awkward}", f"u{awkward}", refused_host=f"h{awkward}")
    write_session(database, "plain", "bob")
    ship_all(database, pg_trail_url, "n\t1\\")
    local = sqlite3.connect(database).execute(_EVENT_SQL).fetchall()
    conn = fleet.open_store(pg_trail_url)
    try:
        stored = conn.execute("SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash FROM audit_events "
                              "WHERE node = %s ORDER BY seq", ["n\t1\\"]).fetchall()
        assert [tuple(r) for r in stored] == local
        user, session = conn.execute("SELECT \"user\", id FROM sessions WHERE id <> 'plain'").fetchone()
        assert (user, session) == (f"u{awkward}", f"s{awkward}")
        assert conn.execute("SELECT target_host, target_ip_key FROM channels WHERE decision = 'deny' AND "
                            "session_id = %s", [f"s{awkward}"]).fetchone() == (f"h{awkward}", None)
        assert conn.execute("SELECT \"user\", client_ip_key FROM auth WHERE \"user\" = %s",
                            [f"u{awkward}"]).fetchone() == (f"u{awkward}", fleet.ip_key("203.0.113.7"))
        report = fleet.verify(conn)
        assert report.intact, report.problems
    finally:
        conn.close()


def test_a_batch_partly_stored_before_stores_the_rest_as_one_would(tmp_path, pg_trail_url):  # noqa: F811
    """Events already in PostgreSQL (same hashes) are left out of a batch's COPY and its rows: sending 1..k,
    then 1..n, then k/2..n again gives the same events and rows (first_seq too) as sending 1..n once."""
    from bastion.store.sqlite import Store
    from tests.integration.test_audit_cli import write_session

    database = tmp_path / "n1.db"
    Store(database).close()
    for number in range(4):
        write_session(database, f"s{number}", "alice" if number % 2 else "bob")
    events = sqlite3.connect(database).execute(_EVENT_SQL).fetchall()
    k = len(events) // 2 + 1  # mid-session: the rows of one session written by both batches
    conn = fleet.connect(pg_trail_url)
    try:
        assert fleet.ship_batch(conn, "once", events) == len(events)
        assert fleet.ship_batch(conn, "parts", events[:k]) == k
        assert fleet.ship_batch(conn, "parts", events) == len(events) - k
        assert fleet.ship_batch(conn, "parts", events[k // 2:]) == 0
    finally:
        conn.close()
    assert shipped(pg_trail_url, "parts") == shipped(pg_trail_url, "once")
    once, parts = state_rows(pg_trail_url, "once"), state_rows(pg_trail_url, "parts")
    assert all(once[table] for table in once)
    drop_node = lambda rows: [row[1:] for row in rows]  # noqa: E731
    assert {t: drop_node(r) for t, r in parts.items()} == {t: drop_node(r) for t, r in once.items()}


def test_shipper_reads_the_next_batch_while_storing_and_counts_only_what_committed(filled, pg_trail_url):  # noqa: F811
    """Batches of 7 (many, each prepared on the reader thread while the previous one is stored): every event
    arrives once, in order, the rows the same as one batch makes; shipped_total counts the events committed."""
    shipper = ship_all(filled, pg_trail_url, "small", batch=7)
    assert shipped(pg_trail_url, "small") == local_events(filled)
    assert shipper.shipped_total == len(local_events(filled))
    conn = fleet.connect(pg_trail_url)
    try:
        fleet.ship_batch(conn, "whole", sqlite3.connect(filled).execute(_EVENT_SQL).fetchall())
    finally:
        conn.close()
    small, whole = state_rows(pg_trail_url, "small"), state_rows(pg_trail_url, "whole")
    drop = lambda rows: [row[1:] for row in rows]  # noqa: E731
    assert {t: drop(r) for t, r in small.items()} != {} and all(small.values())
    # first_seq is the row's first event in its batch: the same here, as fill writes each row with one event
    assert {t: drop(r) for t, r in small.items()} == {t: drop(r) for t, r in whole.items()}
