"""The server's operational log on stderr, in one of two shapes (`log_format` in config.toml):

- "text", for people: `2026-05-01T12:00:00Z INFO bastion.sshd: [conn=c1 user=alice] …` (UTC, seconds, Z). Under
  systemd, when stderr is the journal (JOURNAL_STREAM names it), there is no timestamp and no level word: journald
  stamps each line itself and takes the level from a `<N>` syslog prefix. The `bastion` logger's own lines (the
  OpenSSH-worded authentication events, gateway/auth_log.py) then carry no name either, so the journal shows
  `bastion[PID]: Invalid user bob from …` exactly as it shows `sshd[PID]: Invalid user bob from …`.
- "json", for SIEMs: one object per line with time, level, logger, message, and the connection's fields (conn,
  user, session, client_ip, client_port) where the record has them; an exception's traceback in "exception".

Both keep a record on one line whatever a client put in it (printable.py; JSON's own escaping).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from ..config import LOG_FORMATS
from ..printable import PrintableFormatter, json_escaped

__all__ = ["LOG_FORMATS", "configure", "journal_stream"]
PROGRAM_LOGGER = "bastion"  # the program's own voice: under journald its name is already the line's identifier
CONTEXT_FIELDS = ("conn", "user", "session", "client_ip", "client_port")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# syslog priorities for journald's `<N>` line prefix (sd-daemon.h)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_stream(stream: IO[Any], environ: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is connected to the journal: JOURNAL_STREAM ("DEVICE:INODE", set by systemd for a
    service whose output goes to journald) names this very file. A child that inherited the variable but writes
    somewhere else (a pipe, a file) is not under journald (systemd.exec(5), "$JOURNAL_STREAM")."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7  # debug


class TextFormatter(PrintableFormatter):
    """`TIME LEVEL NAME: MESSAGE`, time in UTC with a Z; every line escaped by PrintableFormatter."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt=TIME_FORMAT)


class JournalFormatter(PrintableFormatter):
    """`<N>NAME: MESSAGE` for journald (no time: the journal has it; the level as the `<N>` priority). The
    program's own logger writes `<N>MESSAGE`: the journal's identifier (`bastion`) already names it. A traceback's
    lines each carry the priority, so they stay with their record's level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = super().formatMessage(record)  # the printable message alone (format "%(message)s")
        return message if record.name == PROGRAM_LOGGER else f"{record.name}: {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, seconds, Z), level, logger, message, then the connection's fields
    where present (the text format's `[conn=… user=…]` prefix is left out of the message: it is in the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        context = getattr(record, "context", None)
        if isinstance(context, str) and message.startswith(f"[{context}] "):
            message = message[len(context) + 3:]
        entry: dict[str, Any] = {
            "time": time.strftime(TIME_FORMAT, time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "":
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii=False keeps names readable; json_escaped writes what JSON leaves raw (U+2028, C1) escaped
        return json_escaped(json.dumps(entry, ensure_ascii=False, default=str))


def formatter_for(log_format: str, stream: IO[Any], environ: Mapping[str, str] | None = None) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if journal_stream(stream, environ):
        return JournalFormatter("%(message)s")
    return TextFormatter()


def configure(level: str, log_format: str = "text", stream: IO[Any] | None = None,
              environ: Mapping[str, str] | None = None) -> None:
    """Send the process's log to `stream` (stderr) in `log_format` at `level`; asyncssh's own chatter from
    WARNING up."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(log_format, stream, environ))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
