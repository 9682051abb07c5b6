"""Long audit work as an admin runs it: `audit prune --dry-run` changes nothing and says what a prune would do,
`audit vacuum` (and `prune --vacuum`) gives the space back with the chain still verifying, even while a server
runs; a progress bar on a terminal (a real pty) for verify, export, prune and backup, and nothing when piped."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import pty
import re
import select
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from bastion.audit.writer import AuditLog, ChannelRecord, ListenerRecord, SessionRecord
from bastion.clock import utc_now
from tests.integration.test_serve_loopback import start_serve

ROOT = Path(__file__).resolve().parents[2]
SSH = shutil.which("ssh")


def bastion(home: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == code, proc.stderr
    return proc


def in_a_terminal(home: Path, *args: str) -> tuple[int, str]:
    """`bastion ARGS` with stdin, stdout and stderr on a pseudo-terminal 100 columns wide: all it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(home), *args], stdin=slave,
                            stdout=slave, stderr=slave, cwd=ROOT, env={**env, "TERM": "xterm-256color"})
    os.close(slave)
    drawn = b""
    while select.select([master], [], [], 60)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    return proc.wait(timeout=60), drawn.decode(errors="replace")


def write_log(path: Path, sessions: int, age: timedelta, open_one: bool = False) -> None:
    """`sessions` finished sessions written `age` ago by the real AuditLog (a login, two channels, a listener
    each), and one more left open when `open_one`."""
    when = utc_now() - age

    async def scenario() -> None:
        audit = AuditLog(path, clock=lambda: when)
        audit.start()
        for n in range(sessions + open_one):
            sid = f"{int(age.total_seconds()):x}{n:06x}"
            audit.record_auth("alice", "203.0.113.7", 5000, "publickey", "SHA256:k", "success", "key accepted")
            await audit.open_session(SessionRecord(sid, "alice", "203.0.113.7", 5000, "SHA256:k", "OpenSSH_9.6", when))
            granted = await audit.record_channel(ChannelRecord(sid, "alice", "direct-tcpip", "db.corp.internal",
                                                               "10.1.2.3", 5432, "allow", "r", "granted", when))
            await audit.record_channel(ChannelRecord(sid, "alice", "direct-tcpip", "169.254.169.254",
                                                     "169.254.169.254", 80, "deny", None, "refused", when))
            listener = await audit.record_listener(ListenerRecord(sid, "alice", "127.0.0.1", 8080, 8080, "allow",
                                                                  "r", "granted", when))
            if n < sessions:
                audit.close_channel(granted, 1000, 2000)
                audit.close_listener(listener, "session ended")
                audit.end_session(sid, "client disconnected", 1000, 2000)
        await audit.flush()
        audit.stop()

    asyncio.run(scenario())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    bastion(home, "init", "--listen", "127.0.0.1:0")
    write_log(home / "bastion.db", 60, timedelta(days=100))
    write_log(home / "bastion.db", 5, timedelta(minutes=1))
    return home


def snapshot(database: Path) -> tuple[str, list[str]]:
    """The database as bytes (a hash, WAL included; not the -shm index every reader writes to) and as SQL."""
    digest = hashlib.sha256()
    for path in (database, database.with_name(database.name + "-wal")):
        digest.update(path.name.encode() + (path.read_bytes() if path.exists() else b""))
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return digest.hexdigest(), list(conn.iterdump())
    finally:
        conn.close()


def test_prune_dry_run_changes_nothing_and_says_what_prune_does(home: Path) -> None:
    database = home / "bastion.db"
    before = snapshot(database)
    dry = bastion(home, "audit", "prune", "--older-than", "30d", "--dry-run")
    assert snapshot(database) == before
    said = re.fullmatch(r"would prune before (\S+): (.*); (\d+) events, (\d+) open rows carried over "
                        r"\(dry run: nothing changed\)\n", dry.stdout)
    assert said, dry.stdout
    cutoff = datetime.fromisoformat(said.group(1).replace("Z", "+00:00"))
    assert abs(cutoff - (utc_now() - timedelta(days=30))) < timedelta(minutes=1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", said.group(1))
    assert said.group(2) == "60 auth, 60 sessions, 120 channels, 60 listeners"
    assert (said.group(3), said.group(4)) == ("480", "0")  # 8 events a session
    done = bastion(home, "audit", "prune", "--older-than", "30d")
    untimed = dry.stdout.replace("would prune", "pruned").replace(" (dry run: nothing changed)", "")
    assert done.stdout.split(":", 3)[-1] == untimed.split(":", 3)[-1]  # the same counts; a second later
    assert bastion(home, "audit", "sessions", "--json").stdout.count('"id"') == 5  # the recent ones stay
    assert bastion(home, "audit", "verify").stdout.startswith("intact: ")


def test_vacuum_gives_space_back_and_the_chain_still_verifies(home: Path) -> None:
    write_log(home / "bastion.db", 400, timedelta(days=200))
    pruned = bastion(home, "audit", "prune", "--older-than", "30d", "--vacuum").stdout
    said = re.search(r"vacuumed \S+: ([\d.]+ \w+) -> ([\d.]+ \w+) \(([\d.]+ \w+) given back\)\n\Z", pruned)
    assert said and said.group(3) != "0 B", pruned
    assert bastion(home, "audit", "verify").stdout.startswith("intact: ")
    again = bastion(home, "audit", "vacuum").stdout
    assert re.fullmatch(r"vacuumed \S+: (.+) -> \1 \(0 B given back\)\n", again), again
    assert bastion(home, "audit", "verify", "--json").stdout.count('"intact": true') == 1
    assert "cannot --vacuum" in bastion(home, "audit", "prune", "--older-than", "1d", "--dry-run", "--vacuum",
                                        code=2).stderr


@pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")
def test_vacuum_while_the_server_runs(home: Path, tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    bastion(home, "user", "add", "bob", "--key", f"{key}.pub")
    server, port = start_serve(home)
    try:
        bastion(home, "audit", "prune", "--older-than", "30d")
        assert "given back" in bastion(home, "audit", "vacuum").stdout
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {' '.join((home / 'ssh_host_ed25519_key.pub').read_text().split()[:2])}\n")
        login = subprocess.run([SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
                                "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-W", "127.0.0.2:9",
                                "bob@127.0.0.1"], input=b"", capture_output=True, timeout=30)
        assert b"administratively prohibited" in login.stderr, login.stderr  # logged in; no grant for the tunnel
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert '"user": "bob"' in bastion(home, "audit", "auth", "--user", "bob", "--json").stdout
    assert bastion(home, "audit", "verify").stdout.startswith("intact: ")


LONG_WORK = [("audit", "verify"), ("audit", "export", "{tmp}/export.jsonl"), ("backup", "{tmp}/copy.db"),
             ("audit", "prune", "--older-than", "30d")]


def test_piped_long_work_prints_no_progress(home: Path, tmp_path: Path) -> None:
    for command in LONG_WORK:
        proc = bastion(home, *(part.replace("{tmp}", str(tmp_path)) for part in command))
        assert proc.stderr == "", (command, proc.stderr)  # no bar, no escape sequence: only the result, on stdout
        assert "\x1b" not in proc.stdout and len(proc.stdout.splitlines()) == 1, (command, proc.stdout)


@pytest.mark.parametrize("command,step", [(LONG_WORK[0], "verifying"), (LONG_WORK[1], "exporting"),
                                          (LONG_WORK[2], "copying"), (LONG_WORK[3], "pruning")])
def test_a_terminal_shows_a_progress_bar(home: Path, tmp_path: Path, command: tuple[str, ...], step: str) -> None:
    code, drawn = in_a_terminal(home, *(part.replace("{tmp}", str(tmp_path)) for part in command))
    assert code == 0, drawn
    assert step in drawn and "━" in drawn, drawn
    assert re.search(r"\d+/\d+", drawn), drawn
