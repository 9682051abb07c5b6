"""printable(): what a client names is shown to people with every non-printable character escaped, and the
server's log formatter keeps every record on its own line."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given, strategies as st

from bastion.printable import PrintableFormatter, json_escaped, printable


@pytest.mark.parametrize("text, shown", [
    ("db.corp.internal", "db.corp.internal"),
    ("", ""),
    ("évian-ü.example", "évian-ü.example"),  # printable letters stay as they are
    ("a b", "a b"),
    ("evil\n2026-01-01 INFO forged", "evil\\n2026-01-01 INFO forged"),
    ("x\r\ty", "x\\r\\ty"),
    ("\x1b[2J", "\\x1b[2J"),
    ("\x00\x07\x7f", "\\x00\\x07\\x7f"),
    ("\x85\xa0", "\\x85\\xa0"),  # C1 next line, no-break space
    ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),  # line and paragraph separators
    ("\u202eevil", "\\u202eevil"),  # right-to-left override
    ("\udcff", "\\udcff"),  # a lone surrogate (undecodable bytes)
    ("\U000e0001", "\\U000e0001"),
    ("back\\slash 'quoted'", "back\\slash 'quoted'"),  # not a repr: backslashes and quotes stay
])
def test_printable_table(text, shown):
    assert printable(text) == shown


@given(st.text())
def test_printable_output_is_always_printable_and_printable_text_unchanged(text):
    shown = printable(text)
    assert shown.isprintable()
    if text.isprintable():
        assert shown == text
    assert printable(shown) == shown  # escaping twice changes nothing more


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


@given(JSON_VALUES, st.sampled_from([None, 2]))
def test_json_escaped_is_the_same_value_with_nothing_raw(value, indent):
    text = json_escaped(json.dumps(value, ensure_ascii=False, indent=indent))
    assert json.loads(text) == value
    assert all(line.isprintable() for line in text.split("\n"))


def test_json_escaped_keeps_readable_names_and_escapes_what_json_leaves_raw():
    text = json_escaped(json.dumps({"host": "évian\x9b2J\u2028\x7f\U000e0001"}, ensure_ascii=False))
    assert text == '{"host": "évian\\u009b2J\\u2028\\u007f\\udb40\\udc01"}'


def test_formatter_keeps_each_record_on_one_line_and_escapes_tracebacks():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("bastion.test_printable")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("refused %s:%d", "evil\nINFO bastion.sshd: forged\x1b[2J", 22)
        try:
            raise ValueError("bad\x1b]0;title\x07")
        except ValueError:
            logger.exception("failed for %r", "x\ny")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == "WARNING bastion.test_printable: refused evil\\nINFO bastion.sshd: forged\\x1b[2J:22"
    assert lines[1] == "ERROR bastion.test_printable: failed for 'x\\ny'"  # a %r stays as it was
    assert lines[2] == "Traceback (most recent call last):"  # the traceback keeps its lines
    assert lines[-1] == "ValueError: bad\\x1b]0;title\\x07"
    assert all(line.isprintable() for line in lines)
