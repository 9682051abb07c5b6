"""Client-supplied text made safe to show an operator: every non-printable character escaped.

A client chooses its user name, its version string and the host of every tunnel it asks for. Written raw, a
newline in one of them forges a log line ("...\\n2026-01-01 INFO bastion.sshd: [conn=c1 user=root] logged
in...") and an escape sequence ("\\x1b[2J") is run by the terminal of the admin reading `bastion audit
channels`. So every line meant for a person (log records, tables, `audit follow`, the banner) goes through
`printable`; output meant for programs (JSON, JSON lines, CSV) keeps the exact stored value, which its own
quoting makes safe (JSON text through `json_escaped`, so not even a C1 control or U+2028 is left raw).

Escapes look like Python's: "\\n", "\\t", "\\x1b", "\\u2028", "\\U000e0001" (what `repr` writes, without the
quotes). Backslashes themselves are left alone, so text that already is a repr (a `%r` in a log message)
passes unchanged; the escaping is there to keep terminals and line-oriented logs intact, not to be reversed:
the exact value is in the audit database and its JSON output.
"""

from __future__ import annotations

import logging

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with every character that `str.isprintable` rejects (controls, line and paragraph separators,
    format characters, lone surrogates, unassigned code points) replaced by its escape; printable text is
    returned as it is."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def json_escaped(text: str) -> str:
    """JSON text written with `ensure_ascii=False` (readable names), with the non-printable characters json
    leaves raw (DEL, C1 controls such as CSI U+009B, U+2028, format characters) written as \\uXXXX escapes: the
    same JSON value, but nothing in it acts on a terminal or splits a line for a reader that honours U+2028 or
    NEL. A raw newline in JSON text is structure (indentation), never string content, and stays."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or char == "\n" else _json_escape(char) for char in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # outside the BMP: a UTF-16 surrogate pair, as JSON spells it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class PrintableFormatter(logging.Formatter):
    """A log formatter whose every record is one line: the rendered message (and its prefix) escaped with
    `printable`. A traceback keeps its lines, each escaped, so no control character reaches the terminal
    or the journal through an exception's text either."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        return "\n".join(printable(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(printable(line) for line in super().formatStack(stack_info).split("\n"))
