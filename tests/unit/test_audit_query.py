"""Audit queries: every filter on every table, table-driven, against a log written by the real AuditLog."""

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from bastion.audit.writer import AuditLog, ChannelRecord, ListenerRecord, SessionRecord
from bastion.audit.filters import FilterError, Filters, ip_key, parse_age, parse_client, parse_target
from bastion.audit.query import make_filters, open_reader, query, session_record, stats, timeline
from bastion.store.sqlite import Store
from fakes import Clock

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)




def channel(session_id, user, host, ip, port, decision, at, **more):
    return ChannelRecord(session_id=session_id, user=user, kind=more.pop("kind", "direct-tcpip"), target_host=host,
                         target_ip=ip, target_port=port, decision=decision,
                         rule="groups.ops.allow" if decision == "allow" else None,
                         reason="granted" if decision == "allow" else "not granted", opened_at=at, **more)


async def write_scenario(path, clock):
    """alice, 3 days ago from 203.0.113.7: a database, a refused metadata address, a listener with one inbound
    connection. bob, an hour ago from 10.8.0.5 after one failed key: ssh to 10.20.0.9, refused 10.20.0.10; still
    connected. mallory, 10 minutes ago from 198.51.100.9: refused."""
    audit = AuditLog(path, clock=clock)
    audit.start()
    alice_at = clock.now = NOW - timedelta(days=3)
    audit.record_auth("alice", "203.0.113.7", 5000, "publickey", "SHA256:a", "success", "key accepted")
    await audit.open_session(SessionRecord("s-alice", "alice", "203.0.113.7", 5000, "SHA256:a", "OpenSSH_9.6", alice_at))
    db = await audit.record_channel(channel("s-alice", "alice", "db.corp.internal", "10.1.2.3", 5432, "allow",
                                            alice_at + timedelta(seconds=1)))
    await audit.record_channel(channel("s-alice", "alice", "169.254.169.254", "169.254.169.254", 80, "deny",
                                       alice_at + timedelta(seconds=2)))
    listener = await audit.record_listener(ListenerRecord(
        "s-alice", "alice", "127.0.0.1", 8080, 8080, "allow", "users.alice.listen", "granted",
        alice_at + timedelta(seconds=3)))
    inbound = await audit.record_channel(channel(
        "s-alice", "alice", "127.0.0.1", "127.0.0.1", 8080, "allow", alice_at + timedelta(seconds=4),
        kind="forwarded-tcpip", listener_id=listener, peer_ip="10.1.9.9", peer_port=41000))
    clock.now = alice_at + timedelta(minutes=5)
    audit.close_channel(inbound, 10, 20)
    audit.close_listener(listener, "cancelled by client")
    audit.close_channel(db, 2_000_000, 30_000_000)
    audit.end_session("s-alice", "client disconnected", 2_000_010, 30_000_020)
    await audit.flush()

    bob_at = clock.now = NOW - timedelta(hours=1)
    audit.record_auth("bob", "10.8.0.5", 6000, "publickey", "SHA256:old", "failure", "key not accepted")
    audit.record_auth("bob", "10.8.0.5", 6000, "publickey", "SHA256:b", "success", "key accepted")
    await audit.open_session(SessionRecord("s-bob", "bob", "10.8.0.5", 6000, "SHA256:b", "OpenSSH_9.8", bob_at))
    await audit.record_channel(channel("s-bob", "bob", "10.20.0.9", "10.20.0.9", 22, "allow", bob_at))
    await audit.record_channel(channel("s-bob", "bob", "10.20.0.10", "10.20.0.10", 22, "deny", bob_at))

    clock.now = NOW - timedelta(minutes=10)
    audit.record_auth("mallory", "198.51.100.9", 7000, "publickey", "SHA256:m", "failure", "key not accepted")
    await audit.flush()
    audit.stop()


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "bastion.db"
    Store(path).close()
    asyncio.run(write_scenario(path, Clock(NOW)))
    return path


def ids(database, table, **filters):
    return [row["id"] for row in query(database, table, now=NOW, **filters)]


CASES = [
    # table, filters, expected ids (oldest first)
    ("auth", {}, [1, 2, 3, 4]),
    ("auth", {"user": "bob"}, [2, 3]),
    ("auth", {"denied": True}, [2, 4]),
    ("auth", {"since": "2h"}, [2, 3, 4]),
    ("auth", {"since": "2h", "until": "30m"}, [2, 3]),
    ("auth", {"client": "198.51.100.0/24"}, [4]),
    ("auth", {"client": "10.8.0.5"}, [2, 3]),
    ("auth", {"limit": 1}, [4]),
    ("sessions", {}, ["s-alice", "s-bob"]),
    ("sessions", {"denied": True}, ["s-alice", "s-bob"]),
    ("sessions", {"target": "10.1.0.0/16"}, ["s-alice"]),
    ("sessions", {"target": "10.20.0.9:22", "since": "1d"}, ["s-bob"]),
    ("sessions", {"target": "10.20.0.9:23"}, []),
    ("sessions", {"client": "10.0.0.0/8"}, ["s-bob"]),
    ("sessions", {"session": "s-bob"}, ["s-bob"]),
    ("sessions", {"since": "2026-11-20"}, ["s-bob"]),
    ("channels", {}, [1, 2, 3, 4, 5]),
    ("channels", {"denied": True}, [2, 5]),
    ("channels", {"denied": True, "since": "1d"}, [5]),
    ("channels", {"user": "alice", "since": "7d"}, [1, 2, 3]),
    ("channels", {"target": "10.1.2.3"}, [1]),
    ("channels", {"target": "10.20.0.0/24:22"}, [4, 5]),
    ("channels", {"target": "10.20.0.0/24:80"}, []),
    ("channels", {"target": "10.0.0.0/8", "since": "7d"}, [1, 4, 5]),
    ("channels", {"target": "0.0.0.0/0", "since": "2h"}, [4, 5]),  # the window is narrower: walked by time
    ("channels", {"target": "DB.corp.internal"}, [1]),  # names match without case
    ("channels", {"target": "*.internal:5432"}, [1]),
    ("channels", {"target": "169.254.0.0/16"}, [2]),
    ("channels", {"target": "[::ffff:10.1.2.3]:5432"}, [1]),  # an IPv4-mapped IPv6 address is the same address
    ("channels", {"client": "203.0.113.0/24"}, [1, 2, 3]),
    ("channels", {"session": "s-bob"}, [4, 5]),
    ("channels", {"limit": 2}, [4, 5]),
    ("listeners", {}, [1]),
    ("listeners", {"target": "127.0.0.1:8080"}, [1]),
    ("listeners", {"denied": True}, []),
    ("listeners", {"user": "bob"}, []),
]


@pytest.mark.parametrize(("table", "filters", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_filters(database, table, filters, expected):
    assert ids(database, table, **filters) == expected


@pytest.mark.parametrize(("table", "filters", "message"), [
    ("auth", {"target": "10.0.0.1"}, "--target does not apply to auth"),
    ("auth", {"session": "s-bob"}, "--session does not apply to auth"),
    ("channels", {"target": "10.0.0.1:http"}, "cannot read port"),
    ("channels", {"target": "10.0.0.1:70000"}, "cannot read port"),
    ("channels", {"target": "[fd00::1"}, "cannot read target"),
    ("channels", {"target": "bad host"}, "cannot read target"),
    ("channels", {"client": "not-an-address"}, "cannot read client"),
    ("channels", {"since": "yesterday"}, "cannot read time"),
    ("channels", {"since": "1h", "until": "2h"}, "is not after --since"),
    ("nothing", {}, "unknown audit table"),
])
def test_bad_filters_say_what_was_expected(database, table, filters, message):
    with pytest.raises(FilterError, match=message):
        query(database, table, now=NOW, **filters)


def test_parsers():
    assert ip_key("10.0.0.1") == ip_key("::ffff:10.0.0.1") == "00000000000000000000ffff0a000001"
    assert ip_key("db.corp") is None and ip_key(None) is None
    assert parse_target("[fd00::/64]:22").port == 22
    assert parse_target("fd00::1:22").port is None  # without brackets, all of it is the IPv6 address
    assert parse_target("10.0.0.0/16").key_range == (ip_key("10.0.0.0"), ip_key("10.0.255.255"))
    assert parse_target("Host.Example:443").name == "host.example"
    assert parse_client("10.1.2.3/8") == (ip_key("10.0.0.0"), ip_key("10.255.255.255"))
    assert parse_age("90d") == timedelta(days=90)
    with pytest.raises(FilterError, match="cannot read age"):
        parse_age("0d")
    assert make_filters(since="2h", now=NOW).since == NOW - timedelta(hours=2)
    with pytest.raises(FilterError, match="--limit"):
        Filters(limit=0)


def test_show_is_a_timeline_of_the_session(database):
    conn = open_reader(database)
    try:
        record = session_record(conn, "s-bob")
        entries = timeline(record)
    finally:
        conn.close()
    # bob's failed key and his login belong to this session (same client address and port, just before it)
    assert [e["event"] for e in entries] == [
        "login failure", "login success", "session start", "channel 4 allow", "channel 5 deny"]
    assert "10.20.0.10:22" in entries[-1]["what"] and entries[-1]["reason"] == "not granted"

    conn = open_reader(database)
    try:
        alice = timeline(session_record(conn, "s-alice"))
    finally:
        conn.close()
    assert [e["event"] for e in alice] == [
        "login success", "session start", "channel 1 allow", "channel 2 deny", "listener 1 allow", "channel 3 allow",
        "session end"]
    assert alice[5]["what"] == "forwarded-tcpip 10.1.9.9:41000 -> 127.0.0.1:8080"
    assert alice[4]["close_reason"] == "cancelled by client"


def test_stats_count_days_users_targets_and_refusals(database):
    conn = open_reader(database)
    try:
        summary = stats(conn, NOW - timedelta(days=7))
    finally:
        conn.close()
    assert summary["per_day"] == [
        {"day": "2026-11-18", "sessions": 1, "channels": 3, "refused_channels": 1, "refused_listeners": 0,
         "auth_failures": 0},
        {"day": "2026-11-21", "sessions": 1, "channels": 2, "refused_channels": 1, "refused_listeners": 0,
         "auth_failures": 2},
    ]
    assert summary["top_users"][0] == {"user": "alice", "sessions": 1, "channels": 3, "refused": 1}
    assert summary["top_targets"][0] == {"target": "db.corp.internal:5432", "channels": 1, "bytes": 32_000_000}
    assert {t["target"] for t in summary["top_refused_targets"]} == {"169.254.169.254:80", "10.20.0.10:22"}
    assert summary["top_refused_sources"][0] == {"client_ip": "10.8.0.5", "refusals": 2, "auth_failures": 1}
