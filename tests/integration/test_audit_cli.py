"""`bastion audit …` as an operator runs it: the real CLI (typer's CliRunner, and a subprocess for `follow`) on a
real SQLite file written by the real AuditLog."""

import asyncio
import csv
import io
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from bastion.audit.writer import AuditLog, ChannelRecord, ListenerRecord, SessionRecord
from bastion.cli.audit import app as audit_app
from bastion.cli.main import app
from bastion.clock import utc_now
from bastion.store.sqlite import Store


def write_session(path, session_id, user, refused_host="169.254.169.254", end=True):
    """A login, a session, one granted and one refused channel, a listener; ended unless `end` is False."""
    async def scenario():
        audit = AuditLog(path)
        audit.start()
        now = utc_now()
        audit.record_auth(user, "203.0.113.7", 5000, "publickey", "SHA256:k", "success", "key accepted")
        await audit.open_session(SessionRecord(session_id, user, "203.0.113.7", 5000, "SHA256:k", "OpenSSH_9.6", now))
        granted = await audit.record_channel(ChannelRecord(
            session_id, user, "direct-tcpip", "db.corp.internal", "10.1.2.3", 5432, "allow", "groups.ops.allow",
            "granted", now))
        await audit.record_channel(ChannelRecord(
            session_id, user, "direct-tcpip", refused_host, refused_host, 80, "deny", None,
            f"{refused_host} is not in an internal network", now))
        listener = await audit.record_listener(ListenerRecord(
            session_id, user, "127.0.0.1", 8080, 8080, "allow", "users.alice.listen", "granted", now))
        if end:
            audit.close_channel(granted, 3 * 1024 * 1024, 12345)
            audit.close_listener(listener, "session ended")
            audit.end_session(session_id, "client disconnected", 3 * 1024 * 1024, 12345)
        await audit.flush()
        audit.stop()

    asyncio.run(scenario())


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    Store(home / "bastion.db").close()
    write_session(home / "bastion.db", "s-alice", "alice")
    return home


def bastion(home, *args, code=0):
    result = CliRunner().invoke(app, ["--home", str(home), "audit", *args], env={"BASTION_HOME": None})
    assert result.exit_code == code, (result.output, result.exception)
    return result


def test_every_audit_command_has_help_with_an_example(home):
    names = [command.name or command.callback.__name__ for command in audit_app.registered_commands]
    assert set(names) >= {"auth", "sessions", "channels", "listeners", "show", "follow", "stats", "verify", "prune",
                          "export"}
    for name in names:
        assert "Example: bastion audit" in bastion(home, name, "--help").output, name


def test_a_terminal_table_in_human_units(home):
    output = bastion(home, "channels").output
    header, granted, refused = output.splitlines()
    assert header.split()[:5] == ["id", "session_id", "user", "kind", "target"]
    assert "db.corp.internal:5432 (10.1.2.3)" in granted and "3.0 MiB" in granted and "12.1 KiB" in granted
    assert "169.254.169.254 is not in an internal network" in refused
    # the columns line up: each row's fields start where the header's do
    assert granted.index("allow") == header.index("decision") == refused.index("deny")
    assert "3.0 MiB" in bastion(home, "sessions").output


def test_json_jsonl_and_csv_carry_the_stored_values(home):
    rows = json.loads(bastion(home, "channels", "--json").output)
    assert [(r["target_host"], r["decision"], r["bytes_up"]) for r in rows] == [
        ("db.corp.internal", "allow", 3 * 1024 * 1024), ("169.254.169.254", "deny", 0)]
    lines = bastion(home, "auth", "--jsonl").output.splitlines()
    assert [json.loads(line)["result"] for line in lines] == ["success"]
    table = list(csv.DictReader(io.StringIO(bastion(home, "listeners", "--csv").output)))
    assert table[0]["listen_port"] == "8080" and table[0]["close_reason"] == "session ended"


def test_empty_results_say_so(home):
    assert bastion(home, "channels", "--user", "nobody").output == "(no channels match)\n"
    assert bastion(home, "channels", "--user", "nobody", "--json").output == "[]\n"
    assert bastion(home, "channels", "--user", "nobody", "--jsonl").output == ""


@pytest.mark.parametrize(("args", "message"), [
    (["channels", "--since", "yesterday"], "cannot read time 'yesterday'"),
    (["channels", "--target", "10.0.0.0/8:ssh"], "cannot read port"),
    (["auth", "--target", "10.0.0.1"], "--target does not apply to auth"),
    (["channels", "--json", "--csv"], "choose one output format"),
    (["follow", "--table", "logins"], "unknown table 'logins'"),
])
def test_bad_filters_get_a_clear_error(home, args, message):
    output = " ".join(bastion(home, *args, code=2).output.split())  # the box around the message wraps lines
    assert message in output


def test_a_missing_database_is_a_clear_error(tmp_path):
    result = bastion(tmp_path, "sessions", code=2)
    assert "no database here; run `bastion init` first" in result.output


def test_show_tells_the_session_as_a_timeline(home):
    output = bastion(home, "show", "s-alice").output
    events = [line.split("  ")[1].strip() for line in output.splitlines()[1:]]
    assert events == ["login success", "session start", "channel 1 allow", "channel 2 deny", "listener 1 allow",
                      "session end"]
    record = json.loads(bastion(home, "show", "s-alice", "--json").output)
    assert record["session"]["end_reason"] == "client disconnected" and len(record["timeline"]) == 6
    assert "no session 'nope'" in bastion(home, "show", "nope", code=2).output


def test_stats(home):
    summary = json.loads(bastion(home, "stats", "--since", "1d", "--json").output)
    assert summary["per_day"][0]["sessions"] == 1 and summary["per_day"][0]["refused_channels"] == 1
    assert summary["top_refused_targets"] == [{"target": "169.254.169.254:80", "refusals": 1}]
    output = bastion(home, "stats").output
    assert "top refused targets" in output and "169.254.169.254:80" in output


def test_verify_exit_codes_and_a_plain_sqlite_edit(home):
    assert bastion(home, "verify").output.startswith("intact: 8 events (seq 1..8), 5 rows; head 8:")
    conn = sqlite3.connect(home / "bastion.db")
    conn.execute("UPDATE channels SET decision = 'allow', reason = 'granted' WHERE id = 2")
    conn.commit()
    conn.close()
    output = bastion(home, "verify", code=1).output
    assert output.startswith("BROKEN: 1 problem(s); first: channels row 2 edited: decision is 'allow', event 4 says "
                             "'deny'")
    assert json.loads(bastion(home, "verify", "--json", code=1).output)["intact"] is False


def test_prune_then_export_then_verify_the_file_elsewhere(home, tmp_path):
    output = bastion(home, "prune", "--older-than", "90d").output
    assert output.startswith("pruned before ") and "0 events" in output  # nothing is that old yet
    bastion(home, "prune", "--older-than", "soon", code=2)
    exported = tmp_path / "elsewhere" / "audit.jsonl"
    exported.parent.mkdir()
    assert bastion(home, "export", str(exported)).output.startswith(f"exported 8 events to {exported}; head 8:")
    assert bastion(tmp_path / "no-home", "verify", "--file", str(exported)).output.startswith("intact: 8 events")
    exported.write_text(exported.read_text().replace("169.254.169.254", "10.1.2.4"))
    assert "edited" in bastion(tmp_path / "no-home", "verify", "--file", str(exported), code=1).output


def test_follow_prints_new_events_live_and_stops_cleanly_on_ctrl_c(home):
    """1. follow the refusals as JSON lines 2. the backlog since 1h comes first 3. a new refusal appears while it
    runs 4. Ctrl-C ends it with exit 0."""
    follow = subprocess.Popen(
        [sys.executable, "-m", "bastion", "--home", str(home), "audit", "follow", "--denied", "--since", "1h",
         "--jsonl", "--interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follow.stdout], daemon=True).start()
    try:
        backlog = json.loads(lines.get(timeout=15))
        assert (backlog["table"], backlog["row"]["target_host"]) == ("channels", "169.254.169.254")
        write_session(home / "bastion.db", "s-bob", "bob", refused_host="10.99.99.99", end=False)
        live = json.loads(lines.get(timeout=10))
        assert (live["row"]["user"], live["row"]["target_host"], live["kind"]) == ("bob", "10.99.99.99", "insert")
        assert len(live["hash"]) == 64  # a SIEM keeps these: `verify --head SEQ:HASH` checks against them later
        assert lines.empty()  # granted channels and logins are not refusals
    finally:
        follow.send_signal(signal.SIGINT)
        code = follow.wait(timeout=10)
    assert code == 0 and "Traceback" not in follow.stderr.read()


def test_follow_stops_after_limit(home):
    write_session(home / "bastion.db", "s-carol", "carol")
    output = bastion(home, "follow", "--since", "1h", "--user", "carol", "--limit", "3").output
    assert [line.split("  ")[1].strip() for line in output.splitlines()] == [
        "login success", "session start", "channel allow"]


def test_sessions_filters_reach_through_their_channels(home):
    write_session(home / "bastion.db", "s-bob", "bob", refused_host="10.99.99.99")
    rows = json.loads(bastion(home, "sessions", "--target", "10.99.0.0/16", "--json").output)
    assert [r["id"] for r in rows] == ["s-bob"]
    assert [r["id"] for r in json.loads(bastion(home, "sessions", "--denied", "--limit", "1", "--json").output)] == [
        "s-bob"]
