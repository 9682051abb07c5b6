"""Metrics (#22 part 4) without a server: the metrics_listen key, the bounded label values (hypothesis: no text a
client sends becomes a label), the channel-open timer's results, and the HTTP endpoint's answers."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bastion.config import Config, load_config, render_config
from bastion.errors import ConfigError
from bastion.gateway.metrics import GatewayMetrics
from bastion.service import metrics as metrics_module
from bastion.service.metrics import (AUTH_METHODS, AUTH_REASON_CLASSES, CHANNEL_KINDS, DECISIONS, Metrics,
                                     auth_reason_class, start_metrics_server)


# ---- the config key ----------------------------------------------------------------------------------


def test_off_by_default_and_round_trips(tmp_path):
    assert load_config(tmp_path, environ={}).metrics_listen == ""
    config = Config(home=tmp_path, metrics_listen="[::1]:9122")
    (tmp_path / "config.toml").write_text(render_config(config))
    assert 'metrics_listen = "[::1]:9122"' in render_config(config)
    assert load_config(tmp_path, environ={}) == config
    assert load_config(tmp_path, environ={"BASTION_METRICS_LISTEN": "127.0.0.1:9"}).metrics_listen == "127.0.0.1:9"
    assert load_config(tmp_path, environ={"BASTION_METRICS_LISTEN": ""}).metrics_listen == ""


@pytest.mark.parametrize("text, message", [
    ("metrics_listen = 9122\n", "metrics_listen must be a string HOST:PORT, or empty for off"),
    ('metrics_listen = "localhost"\n', "metrics_listen 'localhost' must be HOST:PORT, e.g. 127.0.0.1:9122"),
    ('metrics_listen = "127.0.0.1:99999"\n', "metrics_listen '127.0.0.1:99999' must be HOST:PORT"),
])
def test_a_bad_address_is_one_line_naming_file_and_key(tmp_path, text, message):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path, environ={})
    assert message in str(error.value) and "config.toml" in str(error.value)
    assert "\n" not in str(error.value)


# ---- bounded labels --------------------------------------------------------------------------------

@pytest.mark.parametrize("result, reason, expected", [
    ("success", "key accepted", "accepted"),
    ("success", "certificate accepted: key id 'x' serial 1 from CA ops", "accepted"),
    ("success", "key accepted with a verification code", "accepted"),
    ("failure", "key not accepted", "unknown_key"),
    ("failure", "DSA keys are refused (1024-bit, SHA-1 signatures; OpenSSH disabled them in 7.0)", "weak_key"),
    ("failure", "RSA keys need at least 2048 bits; this one has 1024", "weak_key"),
    ("failure", "user removed", "account"),
    ("failure", "key removed", "account"),
    ("failure", "access expired at 2026-01-01T00:00:00Z", "account"),
    ("failure", 'key not allowed from 127.0.0.3 (from="127.0.0.1")', "key_options"),
    ("failure", "key expired at 2020-01-01T00:00:00Z (expiry-time)", "key_options"),
    ("failure", "certificate refused: certificate names no principals: key id 'x'", "certificate"),
    ("failure", "too many authentication failures", "too_many_failures"),
    ("failure", "login grace time exceeded", "login_timeout"),
    ("failure", "source refused for 30s after repeated failed connections", "penalty"),
    ("failure", "startup limit 10:30:100 reached; dropping connections", "startup_limit"),
    ("failure", "audit log unavailable", "audit_unavailable"),
    ("failure", "user removed during login", "changed_during_login"),
    ("failure", "wrong verification code", "second_factor"),
    ("failure", "verification code already used", "second_factor"),
    ("failure", "verification code required but none enrolled", "second_factor"),
    ("failure", "a verification code is required during login", "second_factor"),
    ("failure", "key SHA256:abc revoked by the policy", "revoked"),
    ("failure", "certificate refused: certificate serial 7 revoked: key id 'x'", "revoked"),
    ("failure", "revoked keys cannot be checked (unreadable); refusing key and certificate logins", "revoked"),
    ("failure", "something new nobody classified", "other"),
])
def test_audited_login_reasons_fall_into_a_few_classes(result, reason, expected):
    assert auth_reason_class(result, reason) == expected


@given(result=st.text(max_size=20), reason=st.text(max_size=300))
def test_no_reason_text_becomes_a_label(result, reason):
    assert auth_reason_class(result, reason) in AUTH_REASON_CLASSES


hostile = st.one_of(st.none(), st.integers(), st.text(max_size=64), st.binary(max_size=16), st.floats())


@given(table=st.sampled_from(["auth", "sessions", "channels", "listeners", "other", ""]),
       row_id=st.one_of(st.none(), st.integers(1, 10)),
       values=st.dictionaries(st.sampled_from(["method", "result", "reason", "kind", "decision", "bytes_up",
                                               "bytes_down", "user"]), hostile))
def test_any_audited_row_counts_with_bounded_labels_and_never_raises(table, row_id, values):
    metrics = Metrics()
    metrics.audited(table, row_id, values)  # must not raise, whatever the row holds
    allowed = {"method": AUTH_METHODS | {"other"}, "result": {"success", "failure", "other"},
               "reason": AUTH_REASON_CLASSES, "kind": CHANNEL_KINDS | {"other"}, "decision": DECISIONS | {"other"}}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        if not family.name.startswith(("bastion_auth", "bastion_channel_opens", "bastion_listener")):
            continue
        for sample in family.samples:
            assert "user" not in sample.labels
            for label, seen in sample.labels.items():
                if label in allowed:
                    assert seen in allowed[label], (label, seen)


def test_a_session_channel_and_bytes_count_once():
    metrics = Metrics()
    metrics.audited("auth", None, {"method": "publickey", "result": "success", "reason": "key accepted"})
    metrics.audited("sessions", None, {"id": "s1", "user": "alice"})
    metrics.audited("sessions", "s1", {"ended_at": "…", "bytes_up": 5, "bytes_down": 7})  # an end is no new one
    metrics.audited("channels", None, {"kind": "direct-tcpip", "decision": "allow"})
    metrics.audited("channels", 1, {"closed_at": "…", "bytes_up": 5, "bytes_down": 7, "close_reason": None})
    assert metrics.sessions._value.get() == 1
    assert metrics.channel_opens.labels("direct-tcpip", "allow")._value.get() == 1
    assert metrics.closed_bytes == {"to_target": 5, "to_client": 7}


# ---- the gateway's calls -----------------------------------------------------------------------------

def test_off_costs_nothing_on_the_channel_path():
    off = GatewayMetrics()

    async def opening():
        return "tunnel"

    coroutine = opening()
    assert off.channel_open("direct-tcpip", coroutine) is coroutine
    coroutine.close()
    assert off.handshake_done(off.clock()) is None


def test_channel_open_results():
    metrics = Metrics()

    async def answer(outcome):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def run():
        assert await metrics.channel_open("direct-tcpip", answer("tunnel")) == "tunnel"
        assert await metrics.channel_open("forwarded-tcpip", answer(False)) is False
        for error in (asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no"),
                      asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "down"), asyncio.CancelledError()):
            with pytest.raises(type(error)):
                await metrics.channel_open("x; rm -rf", answer(error))

    asyncio.run(run())
    found = {(s.labels["kind"], s.labels["result"]): s.value
             for family in text_string_to_metric_families(metrics.exposition().decode())
             for s in family.samples if s.name == "bastion_channel_open_duration_seconds_count"}
    assert found == {("direct-tcpip", "opened"): 1, ("forwarded-tcpip", "refused"): 1, ("other", "refused"): 1,
                     ("other", "failed"): 1, ("other", "aborted"): 1}


def test_handshake_is_measured_once():
    metrics = Metrics()
    started = metrics.clock()
    assert metrics.handshake_done(started) is None
    assert metrics.handshake_done(None) is None  # a second user name on the same connection
    assert metrics.handshake._sum.get() >= 0 and metrics.handshake.collect()[0].samples[-2].value == 1


# ---- the HTTP endpoint -------------------------------------------------------------------------------

async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # closed unanswered
        return b""
    finally:
        writer.close()


def test_endpoint_answers_only_get_metrics(monkeypatch):
    monkeypatch.setattr(metrics_module, "_REQUEST_SECONDS", 0.2)

    async def run():
        server = await start_metrics_server(Metrics(), "127.0.0.1:0")
        port = server.sockets[0].getsockname()[1]
        try:
            ok = await _ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
            head, body = ok.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"version=0.0.4" in head
            assert b"bastion_sessions_total 0.0" in body
            assert f"Content-Length: {len(body)}".encode() in head
            assert (await _ask(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")).endswith(b"\r\n\r\n")
            assert (await _ask(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200")
            assert (await _ask(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
            assert (await _ask(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
            assert (await _ask(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert (await _ask(port, b"\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert await _ask(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n") == b""
            assert await _ask(port, b"GET /metrics HTTP/1.1\r\n") == b""  # never finishes: dropped
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(run())


def test_a_taken_port_is_a_config_error():
    async def run():
        first = await start_metrics_server(Metrics(), "127.0.0.1:0")
        port = first.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                await start_metrics_server(Metrics(), f"127.0.0.1:{port}")
        finally:
            first.close()

    asyncio.run(run())


def test_idle_connections_cannot_pile_up(monkeypatch):
    """Past _MAX_CLIENTS connections at once, the next is closed unanswered; once they go, scrapes work again."""
    monkeypatch.setattr(metrics_module, "_MAX_CLIENTS", 3)

    async def run():
        server = await start_metrics_server(Metrics(), "127.0.0.1:0")
        port = server.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        try:
            await asyncio.sleep(0.1)  # the server has taken them
            assert await _ask(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
        finally:
            for _, writer in idle:
                writer.close()
        await asyncio.sleep(0.1)
        assert (await _ask(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
        server.close()

    asyncio.run(run())
