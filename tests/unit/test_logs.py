"""The log's shapes (service/logs.py), the OpenSSH key names (gateway/auth_log.py), log_format in the config, and
sd_notify over a real datagram socket (service/sd_notify.py). End to end with a real server: integration/test_auth_log.py."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import socket
import sys

import pytest
from hypothesis import given, strategies as st

from bastion.config import load_config
from bastion.errors import ConfigError
from bastion.gateway.auth_log import key_type_name
from bastion.service import logs, sd_notify


def record(message: str, name: str = "bastion.sshd", level: int = logging.INFO, **fields) -> logging.LogRecord:
    entry = logging.LogRecord(name, level, __file__, 1, "%s", (message,), None)
    entry.__dict__.update(fields)
    return entry


# ---- journald detection ------------------------------------------------------------------------------------


def test_journal_stream_must_name_this_very_stream(tmp_path):
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        status = os.fstat(journal.fileno())
        named = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert logs.journal_stream(journal, named)
        assert not logs.journal_stream(other, named)  # inherited by a process that writes elsewhere
        for value in ("", "garbage", f"{status.st_dev}:", f":{status.st_ino}", "1:2:3"):
            assert not logs.journal_stream(journal, {"JOURNAL_STREAM": value}), value
        assert not logs.journal_stream(io.StringIO(), named)  # no file descriptor at all


# ---- text, journal and JSON shapes -----------------------------------------------------------------------


def test_text_is_utc_seconds_z_level_name_message():
    line = logs.TextFormatter().format(record("[conn=c1 user=alice] hello"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO bastion\.sshd: \[conn=c1 user=alice\] hello", line)


def test_journal_lines_carry_a_priority_and_no_time_and_the_program_logger_no_name():
    formatter = logs.JournalFormatter("%(message)s")
    assert formatter.format(record("Invalid user bob from 192.0.2.7 port 50022", name="bastion")) == \
        "<6>Invalid user bob from 192.0.2.7 port 50022"
    assert formatter.format(record("draining", name="bastion.service", level=logging.WARNING)) == \
        "<4>bastion.service: draining"
    assert formatter.format(record("x", level=logging.DEBUG)).startswith("<7>")
    assert formatter.format(record("x", level=logging.ERROR)).startswith("<3>")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("failed", level=logging.ERROR)
        failed.exc_info = sys.exc_info()
    lines = formatter.format(failed).split("\n")
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)  # a traceback keeps its priority


def test_json_has_time_level_logger_message_and_the_connection_fields_apart():
    entry = json.loads(logs.JsonFormatter().format(record(
        "[conn=c7 user=alice] key SHA256:x refused", context="conn=c7 user=alice", conn="c7", user="alice",
        client_ip="192.0.2.7", client_port=50022)))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry.pop("time"))
    assert entry == {"level": "INFO", "logger": "bastion.sshd", "message": "key SHA256:x refused", "conn": "c7",
                     "user": "alice", "client_ip": "192.0.2.7", "client_port": 50022}
    plain = json.loads(logs.JsonFormatter().format(record("stopped", name="bastion.service")))
    assert set(plain) == {"time", "level", "logger", "message"}


@given(st.text(), st.text())
def test_json_is_one_line_and_keeps_the_exact_text(message, user):
    line = logs.JsonFormatter().format(record(message, user=user))
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\x1b" not in line
    entry = json.loads(line)
    assert entry["message"] == message and entry.get("user", "") == user


@given(st.text())
def test_text_and_journal_are_one_line_whatever_a_client_names(user):
    for formatter in (logs.TextFormatter(), logs.JournalFormatter("%(message)s")):
        line = formatter.format(record(f"Invalid user {user} from 192.0.2.7 port 1", name="bastion"))
        assert line.isprintable()


def test_configure_picks_the_shape(tmp_path):
    with open(tmp_path / "err", "w") as stream:
        status = os.fstat(stream.fileno())
        journal = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert isinstance(logs.formatter_for("text", stream, journal), logs.JournalFormatter)
        assert isinstance(logs.formatter_for("text", stream, {}), logs.TextFormatter)
        assert isinstance(logs.formatter_for("json", stream, journal), logs.JsonFormatter)  # JSON even under journald


# ---- OpenSSH's key names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, name", [
    ("ssh-ed25519", "ED25519"), ("ssh-rsa", "RSA"), ("ecdsa-sha2-nistp256", "ECDSA"), ("ecdsa-sha2-nistp521", "ECDSA"),
    ("sk-ssh-ed25519@openssh.com", "ED25519-SK"), ("sk-ecdsa-sha2-nistp256@openssh.com", "ECDSA-SK"),
    ("ssh-dss", "DSA"), ("", "UNKNOWN"),
])
def test_key_type_names_are_sshd_s(algorithm, name):
    assert key_type_name(algorithm) == name


# ---- the config key ----------------------------------------------------------------------------------------


def test_log_format_is_text_or_json(tmp_path):
    assert load_config(tmp_path, environ={}).log_format == "text"
    assert load_config(tmp_path, environ={"BASTION_LOG_FORMAT": "json"}).log_format == "json"
    (tmp_path / "config.toml").write_text('log_format = "syslog"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path, environ={})
    assert str(refused.value) == f"{tmp_path / 'config.toml'}: log_format must be one of text, json"


# ---- sd_notify ---------------------------------------------------------------------------------------------


def test_notify_sends_to_a_path_and_to_the_abstract_namespace(tmp_path):
    path = tmp_path / "notify"
    abstract = f"bastion-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_name:
        by_path.bind(str(path))
        by_name.bind("\0" + abstract)
        by_path.settimeout(5)
        by_name.settimeout(5)
        assert sd_notify.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert by_path.recv(100) == b"READY=1"
        assert sd_notify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + abstract})
        assert by_name.recv(100) == b"STOPPING=1"


def test_notify_without_a_socket_does_nothing_and_never_raises(tmp_path):
    assert not sd_notify.notify("READY=1", {})
    assert not sd_notify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not sd_notify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
