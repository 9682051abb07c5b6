"""The fleet's PostgreSQL dialect of the audit filters (#22 part 3) and its config keys, without a database: every
WHERE clause filters.py builds becomes one PostgreSQL reads with the same parameters (the rows it finds are
compared with SQLite's against a real PostgreSQL in tests/integration/test_fleet_queries.py)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, strategies as st

from bastion.audit.filters import TABLES, FilterError, Filters, parse_client, parse_target, where_clause
from bastion.audit.fleet import postgres_sql, redact
from bastion.config import load_config
from bastion.errors import ConfigError

NOW = datetime(2026, 12, 1, tzinfo=UTC)
targets = st.sampled_from(["10.1.2.3", "10.0.0.0/16:22", "db.corp.internal", "*.corp.internal:5432", "[fd00::/64]:22",
                           "Host_1*.Corp.internal", "10.1.2.3:5432"])
clients = st.sampled_from(["203.0.113.7", "10.8.0.0/16", "::/0", "fd00::1"])
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
filters = st.builds(
    Filters, user=st.none() | texts, since=st.none() | st.just(NOW - timedelta(days=1)),
    until=st.none() | st.just(NOW), target=st.none() | targets.map(parse_target), denied=st.booleans(),
    session=st.none() | texts, client=st.none() | clients.map(parse_client), limit=st.none() | st.integers(1, 99))


@given(table=st.sampled_from(TABLES), chosen=filters, time_first=st.booleans())
def test_every_where_clause_becomes_postgresql_with_the_same_parameters(table, chosen, time_first):
    try:
        sql, params = where_clause(table, chosen, time_first=time_first)
    except FilterError:
        return  # e.g. --target on auth: refused before any SQL
    translated = postgres_sql(sql)
    assert "?" not in translated and translated.count("%s") == len(params)
    assert "%" not in translated.replace("%s", "")  # a literal percent would be read as a placeholder
    for sqlite_only in ("ip_key(", "COLLATE", "+target_ip_key", " LIKE "):
        assert sqlite_only not in translated
    assert not re.search(r'(?<![\w."])user(?![\w"])', translated)  # the reserved word, quoted
    if "session_id" in translated and ("sessions" in translated or "channels" in translated):
        assert "node" in translated  # a row's session is looked up on its own node


def test_the_dialect_switch_by_example():
    sql, _ = where_clause("channels", Filters(user="a", client=parse_client("10.0.0.0/8"),
                                              target=parse_target("DB.corp.internal")))
    assert postgres_sql(sql) == (
        '"user" = %s AND EXISTS (SELECT 1 FROM sessions s WHERE s.node = channels.node AND s.id = channels.session_id '
        'AND s.client_ip_key BETWEEN %s AND %s) AND lower(target_host) = %s')
    sql, _ = where_clause("sessions", Filters(denied=True, target=parse_target("*.corp:22")))
    assert "(node, id) IN (SELECT node, session_id FROM channels WHERE target_host ILIKE %s ESCAPE" in postgres_sql(sql)
    assert "c.node = sessions.node AND c.session_id = sessions.id" in postgres_sql(sql)


def test_passwords_never_reach_a_message():
    assert redact("postgresql://bastion:s3cret@db:5432/audit") == "postgresql://bastion:***@db:5432/audit"
    assert redact("postgresql://bastion@db/audit") == "postgresql://bastion@db/audit"


def test_audit_ship_to_and_node_id_are_checked_at_load(tmp_path):
    config = load_config(tmp_path, environ={})
    assert config.audit_ship_to == "" and config.node_id == "" and re.fullmatch(r"[A-Za-z0-9][\w.-]*", config.node)
    shipping = load_config(tmp_path, environ={"BASTION_AUDIT_SHIP_TO": "postgresql://b@db/audit",
                                              "BASTION_NODE_ID": "bastion-2.eu"})
    assert (shipping.audit_ship_to, shipping.node) == ("postgresql://b@db/audit", "bastion-2.eu")
    for key, value, message in (("AUDIT_SHIP_TO", "mysql://db", "must be a PostgreSQL URL"),
                                ("NODE_ID", "two words", "must be 1 to 63 letters"),
                                ("NODE_ID", "-x", "must be 1 to 63 letters"), ("NODE_ID", "x" * 64, "1 to 63")):
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path, environ={f"BASTION_{key}": value})
