"""The fleet's audit trail (#22 part 3) without a server: a filled local log (bench/audit_queries.py's fill, a valid
chain) shipped by the real Shipper thread to a real throwaway PostgreSQL. Every filter of `bastion audit` finds the
same rows there as in SQLite; a shipper stopped mid-backlog resumes where PostgreSQL says; a second chain under
the same node id is an alarm, never an overwrite; `audit prune` keeps what was not shipped."""

from __future__ import annotations

import json
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
from testbed.postgres import pg_url, postgres, wait_until  # noqa: F401 (fixtures)


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


def test_every_filter_finds_the_same_rows_as_sqlite(filled, pg_url):  # noqa: F811
    began = time.monotonic()
    ship_all(filled, pg_url, "n1", batch=1000)
    events = len(local_events(filled))
    print(f"shipped {events} events in {time.monotonic() - began:.2f}s")
    assert shipped(pg_url, "n1") == local_events(filled)
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
    conn = fleet.open_store(pg_url)
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


def test_a_shipper_stopped_mid_backlog_resumes(filled, pg_url):  # noqa: F811
    expected = local_events(filled)
    first = Shipper(filled, pg_url, "n1", batch=100, poll=0.05)
    first.start()
    wait_until(lambda: first.shipped.seq >= 500)
    first.stop()
    partial = shipped(pg_url, "n1")
    assert 500 <= len(partial) < len(expected) and partial == expected[:len(partial)]
    second = ship_all(filled, pg_url, "n1", batch=100)
    assert second.last_error is None
    assert shipped(pg_url, "n1") == expected  # nothing lost, nothing twice
    conn = fleet.open_store(pg_url)
    try:
        report = fleet.verify(conn)
    finally:
        conn.close()
    assert report.intact, report.as_dict()
    assert report.nodes["n1"].events == len(expected) and report.nodes["n1"].rows > 7500


def test_two_chains_under_one_node_id_are_an_alarm_not_an_overwrite(filled, pg_url, tmp_path):  # noqa: F811
    ship_all(filled, pg_url, "n1")
    before = shipped(pg_url, "n1")
    other = tmp_path / "other.db"
    fill(other, sessions=100, channels=300, days=1, now=utc_now(), seed=9)
    shipper = Shipper(other, pg_url, "n1")
    shipper.start()
    try:
        wait_until(lambda: (shipper.last_error or "").startswith("ALARM"))
    finally:
        shipper.stop()
    assert "two nodes share this node_id" in shipper.last_error
    assert shipped(pg_url, "n1") == before
    store = fleet.open_store(pg_url)
    try:  # every node's `audit ship status` sees the alarm
        assert [r["reported_error"] for r in fleet.node_reports(store)][0].startswith("ALARM")
    finally:
        store.close()
    # the same batch sent straight: refused whole, nothing stored
    conn = fleet.connect(pg_url)
    try:
        events = sqlite3.connect(other).execute("SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash FROM "
                                                "audit_events ORDER BY seq LIMIT 50").fetchall()
        with pytest.raises(fleet.ShipAlarm, match="already in PostgreSQL with another hash"):
            fleet.ship_batch(conn, "n1", events)
        assert fleet.ship_batch(conn, "n1-other", events) == 50
        assert fleet.ship_batch(conn, "n1-other", events) == 0  # again: idempotent
    finally:
        conn.close()
    assert shipped(pg_url, "n1") == before


def test_prune_keeps_the_events_not_yet_shipped(tmp_path, pg_url):  # noqa: F811
    home = tmp_path / "home"
    runner = CliRunner()

    def bastion(*args: str):
        return runner.invoke(app, ["--home", str(home), *args], env={"BASTION_HOME": None})

    assert bastion("init", "--listen", "127.0.0.1:0").exit_code == 0
    config = home / "config.toml"
    config.write_text(config.read_text().replace('audit_ship_to = ""', f'audit_ship_to = "{pg_url}"')
                      .replace('node_id = ""', 'node_id = "n1"'))
    database = home / "bastion.db"
    fill(database, sessions=300, channels=900, days=10, now=utc_now() - timedelta(days=2))
    events = local_events(database)
    conn = fleet.connect(pg_url)
    try:
        fleet.migrate(conn)
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


def test_follow_store_follows_every_node_as_it_ships(tmp_path, pg_url):  # noqa: F811
    from bastion.store.sqlite import Store
    from tests.integration.test_audit_cli import write_session

    databases = {}
    for name in ("n1", "n2"):
        databases[name] = tmp_path / f"{name}.db"
        Store(databases[name]).close()
        for number in range(3):
            write_session(databases[name], f"{name}-s{number}", "alice" if number else "bob")
    conn = fleet.connect(pg_url)
    fleet.migrate(conn)
    conn.close()
    follower = subprocess.Popen(
        [sys.executable, "-m", "bastion", "--home", str(tmp_path / "nohome"), "audit", "follow", "--store", pg_url,
         "--table", "sessions", "--user", "alice", "--jsonl", "--limit", "8", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # it has looked once: no node yet, so every node it meets is followed from its first event
        for name, database in databases.items():
            ship_all(database, pg_url, name)
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert follower.returncode == 0 and len(events) == 8, err
    assert {(e["node"], e["row"]["id"], e["kind"]) for e in events} == {
        (node, f"{node}-s{n}", kind) for node in ("n1", "n2") for n in (1, 2) for kind in ("insert", "update")}
