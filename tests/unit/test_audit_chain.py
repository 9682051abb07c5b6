"""Tamper evidence: edits, deletions and insertions made with plain sqlite3 are each caught by verify; prune keeps
the chain verifiable; an export verifies without the database."""

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from bastion.audit.writer import AuditLog, ChannelRecord, SessionRecord
from bastion.audit.chain import GENESIS, event_hash
from bastion.audit.retention import AuditTampered, export, prune, verify, verify_export
from bastion.store.schema import MIGRATIONS, connect
from bastion.store.sqlite import Store
from fakes import Clock

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)




def channel(session_id, host, at, decision="allow"):
    return ChannelRecord(session_id=session_id, user="alice", kind="direct-tcpip", target_host=host, target_ip=host,
                         target_port=22, decision=decision, rule=None, reason="granted", opened_at=at)


async def a_session(audit, clock, session_id, at, close=True):
    """Events in order: auth insert, session insert, channel insert, channel update, session update."""
    clock.now = at
    audit.record_auth("alice", "203.0.113.7", 5000, "publickey", "SHA256:a", "success", "key accepted")
    await audit.open_session(SessionRecord(session_id, "alice", "203.0.113.7", 5000, "SHA256:a", "OpenSSH_9.6", at))
    channel_id = await audit.record_channel(channel(session_id, "10.1.2.3", at))
    if close:
        clock.now = at + timedelta(minutes=1)
        audit.close_channel(channel_id, 100, 200)
        audit.end_session(session_id, "client disconnected", 100, 200)
    await audit.flush()


def written(path, sessions=(("s1", NOW - timedelta(hours=2)), ("s2", NOW - timedelta(hours=1)))):
    Store(path).close()

    async def scenario():
        clock = Clock(NOW)
        audit = AuditLog(path, clock=clock)
        audit.start()
        for session_id, at in sessions:
            await a_session(audit, clock, session_id, at)
        audit.stop()

    asyncio.run(scenario())
    return path


def sql(path, *statements):
    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def rechain_from(path, seq, edit):
    """What someone who knows the scheme does: change event `seq` with `edit(payload)` and recompute every hash
    after it, so the chain on its own is valid again."""
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT seq, time, kind, tbl, row_id, payload, prev_hash FROM audit_events WHERE seq >= ? "
                        "ORDER BY seq", [seq]).fetchall()
    prev = rows[0][6]
    for number, time, kind, tbl, row_id, payload, _ in rows:
        if number == seq:
            payload = edit(payload)
        digest = event_hash(prev, number, time, kind, tbl, row_id, payload)
        conn.execute("UPDATE audit_events SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                     [payload, prev, digest, number])
        prev = digest
    conn.commit()
    conn.close()


def test_an_untouched_log_verifies(tmp_path):
    report = verify(written(tmp_path / "bastion.db"))
    assert report.intact, report.problems
    assert (report.events, report.rows, report.first_seq) == (10, 6, 1)


# each: what an intruder runs with plain sqlite3, and what verify must name first
TAMPERING = [
    ("edit a channel row", ["UPDATE channels SET target_host = '10.66.6.6' WHERE id = 1"],
     "channels row 1 edited: target_host is '10.66.6.6', event 4 says '10.1.2.3'"),
    ("edit a refusal into a success", ["UPDATE auth SET result = 'failure' WHERE id = 2"], "auth row 2 edited"),
    ("shorten a session", ["UPDATE sessions SET ended_at = NULL, end_reason = NULL WHERE id = 's1'"],
     "sessions row 's1' edited"),
    ("delete a session row", ["DELETE FROM sessions WHERE id = 's2'"], "sessions row 's2' deleted"),
    ("delete an auth row", ["DELETE FROM auth WHERE id = 1"], "auth row 1 deleted"),
    ("insert a channel row", ["INSERT INTO channels (session_id, user, kind, target_host, target_port, decision, "
                              "reason, opened_at) VALUES ('s1', 'alice', 'direct-tcpip', 'x', 22, 'allow', 'ok', "
                              "'2026-11-21T10:00:00.000Z')"], "channels row 3 inserted: no audit event wrote it"),
    ("edit an event's payload", ["UPDATE audit_events SET payload = replace(payload, '10.1.2.3', '10.6.6.6') "
                                 "WHERE seq = 3"], "event 3 (insert channels 1) edited"),
    ("edit an event's time", ["UPDATE audit_events SET time = '2020-01-01T00:00:00.000Z' WHERE seq = 2"],
     "event 2 (insert sessions s1) edited"),
    ("delete an event", ["DELETE FROM audit_events WHERE seq = 7"], "event 7 deleted: the chain jumps from seq 6 to 8"),
    ("delete the first events", ["DELETE FROM audit_events WHERE seq <= 2"], "events 1..2 deleted"),
    ("delete a row and its events", ["DELETE FROM audit_events WHERE seq = 1", "DELETE FROM auth WHERE id = 1"],
     "event 1 deleted"),
    ("insert an event", ["INSERT INTO audit_events VALUES (11, '2026-11-21T12:00:00.000Z', 'insert', 'auth', 9, "
                         "'{}', '" + "0" * 64 + "', '" + "1" * 64 + "')"], "event 11 inserted or replaced"),
    ("replace an event", ["UPDATE audit_events SET prev_hash = '" + "2" * 64 + "' WHERE seq = 5"],
     "event 5 inserted or replaced, or event 4 rewritten"),
]


@pytest.mark.parametrize(("statements", "first"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING])
def test_tampering_with_plain_sqlite_is_caught(tmp_path, statements, first):
    path = written(tmp_path / "bastion.db")
    sql(path, *statements)
    report = verify(path)
    assert not report.intact
    assert report.problems[0].startswith(first), report.problems


def test_rewriting_the_chain_needs_a_head_kept_elsewhere(tmp_path):
    path = written(tmp_path / "bastion.db")
    recorded = verify(path).head  # e.g. shipped to the SIEM by `follow --jsonl`
    # 1. an edited event with its own hash fixed breaks the next link
    rechain_from(path, 4, lambda payload: payload)  # no change: still intact
    assert verify(path).intact
    conn = sqlite3.connect(path)
    payload, prev = conn.execute("SELECT payload, prev_hash FROM audit_events WHERE seq = 4").fetchone()
    forged = payload.replace("10.1.2.3", "10.6.6.6")
    conn.execute("UPDATE audit_events SET payload = ?, hash = ? WHERE seq = 4",
                 [forged, event_hash(prev, 4, *conn.execute("SELECT time, kind, tbl, row_id FROM audit_events "
                                                              "WHERE seq = 4").fetchone(), forged)])
    conn.commit()
    conn.close()
    assert verify(path).problems[0].startswith("event 5 inserted or replaced, or event 4 rewritten")
    # 2. rewriting every later hash as well (and the rows) makes the chain consistent on its own...
    sql(path, "UPDATE channels SET target_host = '10.6.6.6', target_ip = '10.6.6.6'",
        "UPDATE audit_events SET payload = replace(payload, '10.1.2.3', '10.6.6.6') WHERE tbl = 'channels'")
    rechain_from(path, 1, lambda payload: payload)
    assert verify(path).intact
    # 3. ...but not with the head recorded elsewhere before
    report = verify(path, head=f"{recorded.seq}:{recorded.hash}")
    assert report.problems == [f"event {recorded.seq} is not the one recorded elsewhere: the chain was rewritten "
                               "from there on"]


def test_deleting_the_newest_events_shows_against_a_recorded_head(tmp_path):
    path = written(tmp_path / "bastion.db")
    recorded = verify(path).head
    sql(path, "DELETE FROM audit_events WHERE seq = 10", "UPDATE sessions SET ended_at = NULL, end_reason = NULL, "
        "bytes_up = 0, bytes_down = 0 WHERE id = 's2'")
    assert verify(path).intact  # a shorter chain is a valid chain...
    assert verify(path, head=f"{recorded.seq}:{recorded.hash}").problems[0].startswith("event 10 deleted")


def test_the_writer_marks_a_chain_cut_while_it_runs(tmp_path):
    path = tmp_path / "bastion.db"
    Store(path).close()

    async def scenario():
        clock = Clock(NOW)
        audit = AuditLog(path, clock=clock)
        audit.start()
        await a_session(audit, clock, "s1", NOW)
        # 1. someone removes the newest event and its row, hoping the next event reuses the seq
        sql(path, "DELETE FROM audit_events WHERE seq = 5", "UPDATE sessions SET ended_at = NULL, end_reason = NULL, "
            "bytes_up = 0, bytes_down = 0 WHERE id = 's1'")
        # 2. the writer notices on its next batch and says so in the chain
        await a_session(audit, clock, "s2", NOW + timedelta(minutes=5))
        audit.stop()

    asyncio.run(scenario())
    report = verify(path)
    assert not report.intact
    assert report.problems[0].startswith("event 5: the audit writer found the chain cut while it ran")


def test_rows_from_before_the_chain_are_adopted_once(tmp_path):
    path = tmp_path / "bastion.db"
    conn = connect(path)
    conn.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    conn.execute("INSERT INTO channels (session_id, user, kind, target_host, target_ip, target_port, decision, "
                 "reason, opened_at, closed_at) VALUES ('s0', 'alice', 'direct-tcpip', 'db', '10.1.2.3', 22, 'allow', "
                 "'granted', '2026-01-01T00:00:00.000Z', '2026-01-01T00:01:00.000Z')")
    conn.commit()
    conn.close()
    Store(path).close()  # migrates
    audit = AuditLog(path)
    audit.start()
    audit.stop()
    report = verify(path)
    assert report.intact and report.events == 1
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT target_ip_key FROM channels").fetchone() == ("00000000000000000000ffff0a010203",)
    assert conn.execute("SELECT kind FROM audit_events").fetchall() == [("adopt",)]
    conn.close()


def test_emptying_the_chain_is_not_adopted_on_the_next_start(tmp_path):
    path = written(tmp_path / "bastion.db")
    sql(path, "DELETE FROM audit_events", "UPDATE channels SET target_host = '10.6.6.6' WHERE id = 1")
    audit = AuditLog(path)
    audit.start()  # a restart must not bless the edited rows as a new beginning
    audit.stop()
    report = verify(path)
    assert report.problems[0].startswith("event 1: the audit writer found the chain cut while it ran")
    assert "channels row 1 inserted: no audit event wrote it" in report.problems


def test_prune_removes_old_finished_rows_and_the_chain_still_verifies(tmp_path):
    old = NOW - timedelta(days=100)
    path = tmp_path / "bastion.db"
    Store(path).close()

    async def scenario():
        clock = Clock(old)
        audit = AuditLog(path, clock=clock)
        audit.start()
        await a_session(audit, clock, "old", old)
        await a_session(audit, clock, "long", old + timedelta(hours=1), close=False)  # still connected today
        await a_session(audit, clock, "new", NOW - timedelta(days=1))
        audit.stop()

    asyncio.run(scenario())
    result = prune(path, timedelta(days=90), NOW, chunk=3)  # small chunks: several anchors
    assert result.deleted == {"auth": 2, "sessions": 1, "channels": 1, "listeners": 0}
    assert result.restated == 2  # the long session and its open channel
    report = verify(path)
    assert report.intact, report.problems
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT id FROM sessions ORDER BY started_at")] == ["long", "new"]
    conn.close()
    # the prefix is gone for good: removing more of it is caught, since the anchor names where it ends
    first = report.first_seq
    sql(path, f"DELETE FROM audit_events WHERE seq = {first}")
    assert verify(path).problems[0].startswith(f"events 1..{first} deleted: no prune anchor accounts for them")


def test_prune_refuses_to_launder_tampering(tmp_path):
    path = written(tmp_path / "bastion.db")
    sql(path, "UPDATE auth SET user = 'nobody' WHERE id = 1")
    with pytest.raises(AuditTampered, match="nothing was pruned: auth row 1 edited"):
        prune(path, timedelta(days=1), NOW + timedelta(days=30))


def test_an_export_verifies_without_the_database(tmp_path):
    path = written(tmp_path / "bastion.db")
    exported = tmp_path / "audit.jsonl"
    trailer = export(path, exported, NOW)
    assert trailer["events"] == 10
    path.unlink()
    report = verify_export(exported)
    assert report.intact and report.head.hash == trailer["head_hash"]
    lines = exported.read_text().splitlines()
    # every event carries the row's full state, so the export alone says who went where
    assert json.loads(json.loads(lines[3])["payload"])["target_host"] == "10.1.2.3"
    assert json.loads(lines[1])["prev_hash"] == GENESIS

    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines).replace("10.1.2.3", "10.6.6.6") + "\n")
    assert verify_export(edited).problems[0].startswith("event 3 (insert channels 1) edited")
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-3]) + "\n")
    assert verify_export(cut).problems == ["the export has no trailer: it was cut short"]

