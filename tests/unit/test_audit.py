"""The audit writer: rows committed before the awaited call returns, crash recovery, fail closed."""

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from bastion.audit.writer import AuditLog, AuditUnavailable, ChannelRecord, ListenerRecord, SessionRecord
from bastion.audit.filters import Filters
from bastion.audit.query import open_reader, parse_moment, query, select
from bastion.errors import BastionError
from bastion.store.sqlite import Store


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "bastion.db"
    Store(path).close()  # creates the schema
    return path


def channel(decision="allow", session_id="s1"):
    return ChannelRecord(
        session_id=session_id, user="alice", kind="direct-tcpip", target_host="db", target_ip="10.0.0.5",
        target_port=5432, decision=decision, rule="users.alice.allow: 10.0.0.0/24:5432", reason="granted",
        opened_at=datetime.now(UTC),
    )


def session():
    return SessionRecord(id="s1", user="alice", client_ip="127.0.0.1", client_port=5000,
                         key_fingerprint="SHA256:x", client_version="SSH-2.0-test", started_at=datetime.now(UTC))


def rows(path, sql):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_channel_row_is_committed_when_record_returns(database):
    async def scenario():
        audit = AuditLog(database)
        audit.start()
        await audit.open_session(session())
        channel_id = await audit.record_channel(channel())
        # read from another connection: committed, not just queued
        assert rows(database, f"SELECT decision, closed_at FROM channels WHERE id = {channel_id}") == [("allow", None)]
        audit.close_channel(channel_id, 10, 20)
        audit.end_session("s1", "client disconnected", 10, 20)
        audit.stop()
        return channel_id

    channel_id = asyncio.run(scenario())
    assert rows(database, f"SELECT bytes_up, bytes_down FROM channels WHERE id = {channel_id}") == [(10, 20)]
    assert rows(database, "SELECT end_reason FROM sessions") == [("client disconnected",)]


def test_rows_left_open_are_marked_crash_on_next_start(database):
    async def crashed_run():
        audit = AuditLog(database)
        audit.start()
        await audit.open_session(session())
        await audit.record_channel(channel())
        await audit.record_channel(channel(decision="deny"))
        # no stop(): the process "dies" here with the rows open

    asyncio.run(crashed_run())
    audit = AuditLog(database)
    assert audit.start() == 2  # one session + one allowed channel; the refusal was closed when decided
    audit.stop()
    assert rows(database, "SELECT ended_at IS NOT NULL, end_reason FROM sessions") == [(1, "crash")]
    assert rows(database, "SELECT count(*) FROM channels WHERE closed_at IS NULL") == [(0,)]
    assert rows(database, "SELECT close_reason FROM channels ORDER BY id") == [("crash",), (None,)]


def test_write_failure_refuses_instead_of_dropping(database):
    conn = sqlite3.connect(database)
    conn.execute("CREATE TRIGGER fail BEFORE INSERT ON channels BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    conn.commit()
    conn.close()

    async def scenario():
        audit = AuditLog(database)
        audit.start()
        try:
            with pytest.raises(AuditUnavailable, match="disk is full"):
                await audit.record_channel(channel())
            # the writer survives the failure and keeps serving other rows
            audit.record_auth("alice", "127.0.0.1", 1, "publickey", None, "failure", "key not accepted")
            await audit.flush()
        finally:
            audit.stop()

    asyncio.run(scenario())
    assert rows(database, "SELECT count(*) FROM auth") == [(1,)]


def test_query_filters_and_orders(database):
    async def scenario():
        audit = AuditLog(database)
        audit.start()
        for user in ("alice", "bob", "alice"):
            audit.record_auth(user, "127.0.0.1", 1, "publickey", None, "failure" if user == "bob" else "success", "r")
        await audit.flush()
        audit.stop()

    asyncio.run(scenario())
    assert [r["user"] for r in query(database, "auth")] == ["alice", "bob", "alice"]
    assert [r["user"] for r in query(database, "auth", user="alice")] == ["alice", "alice"]
    assert [r["user"] for r in query(database, "auth", denied=True)] == ["bob"]
    assert len(query(database, "auth", limit=2)) == 2
    assert query(database, "auth", since=datetime.now(UTC) + timedelta(minutes=1)) == []


def test_parse_moment():
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert parse_moment("2h", now) == now - timedelta(hours=2)
    assert parse_moment("15m", now) == now - timedelta(minutes=15)
    assert parse_moment("7d", now) == now - timedelta(days=7)
    assert parse_moment("2026-11-20T10:00:00Z") == datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert parse_moment("2026-11-20") == datetime(2026, 11, 20, tzinfo=UTC)
    with pytest.raises(BastionError, match="cannot read time"):
        parse_moment("yesterday")


# ---- listeners, forwarded channels, batches, readers (#3, #4) ---------------------------------------------


def listener(decision="allow", port=8080):
    return ListenerRecord(session_id="s1", user="alice", listen_host="127.0.0.1", listen_port=port,
                          requested_port=port, decision=decision, rule="users.alice.listen: 127.0.0.1:8080-8090",
                          reason="granted" if decision == "allow" else "not granted", opened_at=datetime.now(UTC))


def test_listener_and_its_forwarded_channel_are_recorded(database):
    async def scenario():
        audit = AuditLog(database)
        audit.start()
        await audit.open_session(session())
        # 1. the listener row is committed before record_listener returns (before the client hears "bound")
        listener_id = await audit.record_listener(listener())
        assert rows(database, f"SELECT decision, closed_at FROM listeners WHERE id = {listener_id}") == [("allow", None)]
        refused_id = await audit.record_listener(listener("deny", 22))
        # 2. an inbound connection through it is a forwarded-tcpip channel naming the listener and the peer
        forwarded = ChannelRecord(
            session_id="s1", user="alice", kind="forwarded-tcpip", target_host="127.0.0.1", target_ip="127.0.0.1",
            target_port=8080, decision="allow", rule=None, reason="through listener", opened_at=datetime.now(UTC),
            listener_id=listener_id, peer_ip="10.0.0.9", peer_port=40000)
        channel_id = await audit.record_channel(forwarded)
        audit.close_channel(channel_id, 5, 6, reason="revoked: grant expired")
        # 3. the client cancels the forward
        audit.close_listener(listener_id, "cancelled by client")
        audit.stop()
        return listener_id, refused_id, channel_id

    listener_id, refused_id, channel_id = asyncio.run(scenario())
    assert rows(database, f"SELECT close_reason FROM listeners WHERE id = {listener_id}") == [("cancelled by client",)]
    # a refused listener never opened: closed when decided, for the reason it was refused
    assert rows(database, f"SELECT closed_at = opened_at, close_reason FROM listeners WHERE id = {refused_id}") == [
        (1, "not granted")]
    assert rows(database, f"SELECT kind, listener_id, peer_ip, peer_port, close_reason FROM channels "
                          f"WHERE id = {channel_id}") == [
        ("forwarded-tcpip", listener_id, "10.0.0.9", 40000, "revoked: grant expired")]


def test_crash_recovery_closes_listeners_too(database):
    async def crashed_run():
        audit = AuditLog(database)
        audit.start()
        await audit.open_session(session())
        await audit.record_listener(listener())

    asyncio.run(crashed_run())
    audit = AuditLog(database)
    assert audit.start() == 2  # the session and the listener
    audit.stop()
    assert rows(database, "SELECT closed_at IS NOT NULL, close_reason FROM listeners") == [(1, "crash")]


def test_one_bad_row_in_a_batch_fails_alone(database):
    async def scenario():
        audit = AuditLog(database)
        audit.start()
        try:
            # queued together, so the writer takes them in one batch
            audit.record_auth("alice", "127.0.0.1", 1, "publickey", None, "success", "first")
            bad = asyncio.ensure_future(audit.record_channel(channel(decision="maybe")))  # CHECK constraint fails
            audit.record_auth("alice", "127.0.0.1", 1, "publickey", None, "success", "second")
            with pytest.raises(AuditUnavailable, match="CHECK constraint"):
                await bad
            await audit.flush()
        finally:
            audit.stop()

    asyncio.run(scenario())
    assert rows(database, "SELECT reason FROM auth ORDER BY id") == [("first",), ("second",)]


def test_a_reader_in_the_middle_of_a_query_does_not_block_the_writer(database):
    async def scenario():
        audit = AuditLog(database)
        audit.start()
        try:
            for number in range(300):
                audit.record_auth(f"user{number}", "127.0.0.1", 1, "publickey", None, "success", "ok")
            await audit.flush()
            reader = open_reader(database)
            pending = select(reader, "auth", Filters())
            first = next(pending)  # the read transaction is open now
            # the writer still commits, promptly
            channel_id = await asyncio.wait_for(audit.record_channel(channel()), timeout=5)
            assert sum(1 for _ in pending) == 299 and first["user"] == "user0"
            reader.close()
            return channel_id
        finally:
            audit.stop()

    assert asyncio.run(scenario()) == 1
