"""Scenario (#20 item 5): an admin who runs fail2ban and a SIEM in front of OpenSSH bastions points them at this one.

1. Real `bastion serve` on loopback, its stderr in a file; the real OpenSSH client logs in with alice's key, with a
   key she does not have, as a user nobody added, and with three wrong keys against max_auth_tries = 2.
2. The log says so in sshd's own words (the lines a real sshd 9.2 wrote for the same four logins), and the real
   `fail2ban-regex` with Debian's stock `sshd` filter (only `_daemon=bastion`, the jail in deploy/fail2ban/) counts
   the failures.
3. log_format = "json": one object a line, the connection's fields apart from the message.
4. Under systemd (JOURNAL_STREAM names stderr): no timestamps, `<N>` priorities, and the journal's view of the
   lines (`HOST bastion[PID]: MESSAGE`, as fail2ban's systemd backend builds it) read by the same filter.
5. sd_notify: READY=1 once the port accepts, RELOADING=1 … READY=1 around SIGHUP, STOPPING=1 on SIGTERM, over a real
   unix datagram socket named by NOTIFY_SOCKET.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SSH = shutil.which("ssh")
FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
JAIL = Path(__file__).resolve().parents[2] / "deploy" / "fail2ban" / "bastion.conf"

pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")
needs_fail2ban = pytest.mark.skipif(
    FAIL2BAN_REGEX is None, reason="needs fail2ban-regex (Debian: apt-get install fail2ban; .ci/run installs it)")

PORT = r"port (\d+)"
FINGERPRINT = r"SHA256:[A-Za-z0-9+/]{43}"
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def bastion(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=60)


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path], check=True,
                   timeout=30)
    return path


def fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{key}.pub"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.split()[1]


def set_config(home: Path, key: str, value: str) -> None:
    """Replace `key = …` in the config.toml that `init` wrote (it writes every key)."""
    path = home / "config.toml"
    text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", path.read_text())
    assert count == 1, f"{key} not in {path}"
    path.write_text(text)


class Serve:
    """`bastion serve` with stderr in a file (a real file: JOURNAL_STREAM can name it)."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, journal: bool = False):
        self.log_path = home.parent / "serve.log"
        self.log_file = self.log_path.open("wb")
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith("BASTION_") and k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
        if journal:
            status = os.fstat(self.log_file.fileno())
            environ["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        self.proc = subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(home), "serve"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     env=environ | (env or {}))
        deadline = time.monotonic() + 30
        while not (match := re.search(r"listening on 127\.0\.0\.1:(\d+)", self.text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"serve did not start:\n{self.text()}")
            time.sleep(0.05)
        self.port = int(match.group(1))

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.text()
        self.log_file.close()
        return self.text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    assert bastion(home, "init", "--listen", "127.0.0.1:0").returncode == 0
    return home


@pytest.fixture
def keys(tmp_path, home):
    """alice's key (added), and three keys nobody has."""
    made = {name: keygen(tmp_path / name) for name in ("alice", "wrong1", "wrong2", "wrong3")}
    assert bastion(home, "user", "add", "alice", "--key", f"{made['alice']}.pub").returncode == 0
    return made


def ssh(serve: Serve, user: str, *keys: Path) -> subprocess.CompletedProcess:
    """A login with these keys, in this order; no command (the bastion shows its banner and closes)."""
    args = [SSH, "-F", "/dev/null", "-p", str(serve.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    for key in keys:
        args += ["-i", str(key)]
    return subprocess.run([*args, f"{user}@127.0.0.1"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def four_logins(serve: Serve, keys: dict[str, Path]) -> None:
    assert ssh(serve, "alice", keys["alice"]).returncode == 0
    assert b"Permission denied (publickey)" in ssh(serve, "alice", keys["wrong1"]).stderr
    assert b"Permission denied (publickey)" in ssh(serve, "bob", keys["wrong1"]).stderr
    too_many = ssh(serve, "alice", keys["wrong1"], keys["wrong2"], keys["wrong3"], keys["alice"])
    assert too_many.returncode != 0


def expected_lines(keys: dict[str, Path]) -> list[str]:
    """What the four logins log, as regular expressions: sshd's wording (auth.c, auth2.c, packet.c), checked
    against a real sshd 9.2 at LogLevel VERBOSE doing the same logins."""
    alice, wrong = (re.escape(fingerprint(keys[n])) for n in ("alice", "wrong1"))
    w2 = re.escape(fingerprint(keys["wrong2"]))
    return [
        rf"Accepted publickey for alice from 127\.0\.0\.1 {PORT} ssh2: ED25519 {alice}",
        rf"Disconnected from user alice 127\.0\.0\.1 {PORT}",
        rf"Failed publickey for alice from 127\.0\.0\.1 {PORT} ssh2: ED25519 {wrong}",
        rf"Connection closed by authenticating user alice 127\.0\.0\.1 {PORT} \[preauth\]",
        rf"Invalid user bob from 127\.0\.0\.1 {PORT}",
        rf"Failed publickey for invalid user bob from 127\.0\.0\.1 {PORT} ssh2: ED25519 {wrong}",
        rf"Connection closed by invalid user bob 127\.0\.0\.1 {PORT} \[preauth\]",
        rf"Failed publickey for alice from 127\.0\.0\.1 {PORT} ssh2: ED25519 {wrong}",
        rf"Failed publickey for alice from 127\.0\.0\.1 {PORT} ssh2: ED25519 {w2}",
        rf"maximum authentication attempts exceeded for alice from 127\.0\.0\.1 {PORT} ssh2 \[preauth\]",
        rf"Disconnecting authenticating user alice 127\.0\.0\.1 {PORT}: Too many authentication failures \[preauth\]",
    ]


def assert_lines(messages: list[str], expected: list[str]) -> None:
    """`messages` match `expected` one for one, in order, and each login's lines name one client port. Whether the
    client's goodbye arrives as a disconnect message before it closes is its own business: sshd logs one as
    "Received disconnect from …", which is left out here."""
    messages = [m for m in messages if not m.startswith("Received disconnect from ")]
    assert len(messages) == len(expected), "\n".join(messages)
    ports = []
    for message, pattern in zip(messages, expected):
        match = re.fullmatch(pattern, message)
        assert match, f"{message!r} is not {pattern!r}"
        ports.append(match.group(1))
    assert len(set(ports[0:2])) == len(set(ports[2:4])) == len(set(ports[4:7])) == len(set(ports[7:])) == 1
    assert len(set(ports)) == 4


def fail2ban(log: Path, filter_spec: str) -> tuple[list[str], str]:
    """`fail2ban-regex LOG FILTER`: the lines it counts as failures, and its whole report for a failure message."""
    result = subprocess.run([FAIL2BAN_REGEX, "--print-all-matched", "--print-no-ignored", "--print-no-missed",
                             str(log), filter_spec], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout
    section = report.split("|- Matched line(s):", 1)
    matched = [line[3:] for line in section[1].split("`-", 1)[0].splitlines() if line.startswith("|  ")] \
        if len(section) == 2 else []
    return matched, report


def counted(matched: list[str]) -> list[str]:
    """The failure lines fail2ban counted, as messages (the part after 'bastion: ' or 'bastion[PID]: ')."""
    return [re.split(r"bastion(?:\[\d+\])?: ", line, maxsplit=1)[1] for line in matched]


# ---- 1, 2: the text log and fail2ban ---------------------------------------------------------------------


@needs_fail2ban
def test_logins_are_logged_in_sshd_words_and_the_stock_sshd_filter_counts_the_failures(home, keys, tmp_path):
    set_config(home, "max_auth_tries", "2")
    serve = Serve(home)
    try:
        four_logins(serve, keys)
        time.sleep(0.3)  # the last connection's close line
    finally:
        text = serve.stop()
    auth = [line for line in text.splitlines() if re.match(rf"{TIME} INFO bastion: ", line)]
    assert_lines([line.split(": ", 1)[1] for line in auth], expected_lines(keys))

    # fail2ban reads the log file as it is, with the jail's filter (deploy/fail2ban/bastion.conf)
    jail = JAIL.read_text()
    assert "filter   = sshd[_daemon=bastion, mode=normal," in jail
    log = tmp_path / "bastion.log"
    log.write_text(text)
    matched, report = fail2ban(log, "sshd[_daemon=bastion]")
    assert [re.sub(PORT, "port N", line) for line in counted(matched)] == [
        "Invalid user bob from 127.0.0.1 port N",
        "maximum authentication attempts exceeded for alice from 127.0.0.1 port N ssh2 [preauth]",
    ], report
    # mode=aggressive also counts a known user whose keys all failed, as it does for sshd
    matched, report = fail2ban(log, "sshd[_daemon=bastion, mode=aggressive]")
    assert "Connection closed by authenticating user alice 127.0.0.1 port" in "\n".join(matched), report
    # the stock filter unchanged takes nothing from lines that say "bastion", not "sshd": the jail's _daemon matters
    matched, report = fail2ban(log, "sshd")
    assert matched == [], report


# ---- 3: JSON -----------------------------------------------------------------------------------------------


def test_json_format_is_one_object_a_line_with_the_connection_fields(home, keys):
    set_config(home, "log_format", '"json"')
    serve = Serve(home)
    try:
        assert b"Permission denied (publickey)" in ssh(serve, "bob", keys["wrong1"]).stderr
        assert ssh(serve, "alice", keys["alice"]).returncode == 0
        time.sleep(0.3)
    finally:
        text = serve.stop()
    entries = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    for entry in entries:
        assert re.fullmatch(TIME, entry["time"]) and entry["level"] in ("INFO", "WARNING", "ERROR"), entry
        assert entry["logger"].startswith("bastion") and entry["message"]
    by_message = {entry["message"]: entry for entry in entries}
    [invalid] = [m for m in by_message if m.startswith("Invalid user bob from 127.0.0.1 port ")]
    entry = by_message[invalid]
    assert entry["logger"] == "bastion" and entry["level"] == "INFO"
    assert entry["user"] == "bob" and entry["client_ip"] == "127.0.0.1" and entry["conn"] == "c1"
    assert invalid.endswith(f"port {entry['client_port']}")
    # a connection's own lines: the context is in the fields, not repeated in the message
    [refused] = [e for e in entries if e["logger"] == "bastion.sshd" and "refused: key not accepted" in e["message"]]
    assert refused["message"].startswith("key SHA256:") and refused["conn"] == "c1" and refused["user"] == "bob"
    [logged_in] = [e for e in entries if e["message"].startswith("logged in from 127.0.0.1:")]
    assert logged_in["user"] == "alice" and logged_in["conn"] == "c2" and len(logged_in["session"]) == 12
    assert any(e["message"].startswith("Accepted publickey for alice ") and e.get("session") == logged_in["session"]
               for e in entries)


def test_a_bad_log_format_is_one_line_naming_file_and_key(home):
    set_config(home, "log_format", '"xml"')
    result = bastion(home, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {home / 'config.toml'}: log_format must be one of text, json"]


# ---- 4: under journald -----------------------------------------------------------------------------------


@needs_fail2ban
def test_under_journald_no_timestamps_and_the_journal_view_reads_like_sshd(home, keys, tmp_path):
    serve = Serve(home, journal=True)
    try:
        assert b"Permission denied (publickey)" in ssh(serve, "bob", keys["wrong1"]).stderr
        time.sleep(0.3)
        pid = serve.proc.pid
    finally:
        text = serve.stop()
    lines = text.splitlines()
    assert all(re.match(r"<[2-7]>", line) for line in lines), text
    assert not re.search(r"\d\d:\d\d:\d\d", text.replace("127.0.0.1", "")), "a timestamp under journald"
    assert any(re.fullmatch(r"<6>bastion\.service: bastion \S+ listening on 127\.0\.0\.1:\d+ \(.*\)", line)
               for line in lines), text
    messages = [line[3:] for line in lines]
    assert any(re.fullmatch(rf"Invalid user bob from 127\.0\.0\.1 {PORT}", m) for m in messages), text
    assert any(m.startswith("bastion.sshd: [conn=c1 user=bob] key SHA256:") for m in messages), text

    # what fail2ban's systemd backend reads: "HOST IDENTIFIER[PID]: MESSAGE" (filtersystemd.formatJournalEntry),
    # journald having taken the <N> off; here with the entry's time in front for fail2ban-regex's file reader
    journal = tmp_path / "journal.txt"
    journal.write_text("".join(f"2026-05-01T12:00:00Z gate bastion[{pid}]: {m}\n" for m in messages))
    matched, report = fail2ban(journal, "sshd[_daemon=bastion, logtype=journal]")
    assert [re.sub(PORT, "port N", line) for line in counted(matched)] == [
        "Invalid user bob from 127.0.0.1 port N"], report


# ---- 5: sd_notify ----------------------------------------------------------------------------------------


def test_sd_notify_ready_reloading_stopping_over_a_real_notify_socket(home, tmp_path):
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    serve = Serve(home, env={"NOTIFY_SOCKET": str(path)})
    try:
        ready = listener.recv(4096).decode()
        assert ready == f"READY=1\nSTATUS=listening on 127.0.0.1:{serve.port}"
        socket.create_connection(("127.0.0.1", serve.port), timeout=5).close()  # ready means accepting
        serve.proc.send_signal(signal.SIGHUP)
        reloading = listener.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
        assert listener.recv(4096).decode() == "READY=1"
        serve.proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert serve.proc.wait(30) == 0
    finally:
        serve.close()
        listener.close()


@pytest.mark.skipif(shutil.which("fail2ban-client") is None or not Path("/etc/fail2ban/filter.d/sshd.conf").exists(),
                    reason="needs fail2ban-client and Debian's /etc/fail2ban (apt-get install fail2ban)")
def test_the_jail_loads_in_fail2ban_with_the_stock_filter_on_the_bastion_unit(tmp_path):
    """deploy/fail2ban/bastion.conf dropped into a copy of the system's /etc/fail2ban: fail2ban-client's own
    config reader (-d dumps what it would send the server) makes a systemd jail on the bastion unit's journal,
    with sshd's failregexes and `bastion` in place of `sshd` in the line prefix."""
    config = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", config, symlinks=True)
    for old in (config / "jail.d").iterdir():
        old.unlink()
    shutil.copy(JAIL, config / "jail.d" / "bastion.conf")
    result = subprocess.run(["fail2ban-client", "-c", str(config), "-d"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    jail = [line for line in result.stdout.splitlines() if line.startswith(("['add', 'bastion'", "['set', 'bastion'",
                                                                            "['multi-set', 'bastion'"))]
    text = "\n".join(jail)
    assert "['add', 'bastion', 'systemd']" in text
    assert "['set', 'bastion', 'addjournalmatch', '_SYSTEMD_UNIT=bastion.service']" in text
    assert "sshd.service" not in text  # the stock filter's own journalmatch is replaced, not added to
    assert "bastion(?:\\\\[\\\\d+\\\\])?:?" in text and "^[iI](?:llegal|nvalid) user" in text
