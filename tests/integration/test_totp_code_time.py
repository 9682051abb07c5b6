"""A person typing a one-time code is not an anonymous client holding a connection open (#21): once the key is proved
the login timer starts again with sshd's LoginGraceTime (120 s), however short `login_grace_seconds` is. Here the
grace is 3 s and the "person" (SSH_ASKPASS) takes 5 s to answer: the login still succeeds, while a client that proves
no key is still cut off at 3 s."""

from __future__ import annotations

import socket
import time

from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)
from tests.integration.test_totp_login import Client, enroll, fresh_code, pytestmark, setup  # noqa: F401

GRACE = 3


def test_a_slow_typist_gets_the_code_time_and_a_silent_client_does_not(home, echo_server, tmp_path):
    keys = setup(home, tmp_path, echo_server)
    totp = enroll(home, "alice")
    config = home / "config.toml"
    config.write_text(config.read_text().replace("login_grace_seconds = 30", f"login_grace_seconds = {GRACE}"))
    assert f"login_grace_seconds = {GRACE}\n" in config.read_text()
    proc, port = start_serve(home)
    try:
        client = Client(tmp_path, home, port)
        client.askpass.write_text(f'#!/bin/sh\nsleep {GRACE + 2}\ncat "{client.code_file}"\n')
        code = fresh_code(totp) if 30 - time.time() % 30 > GRACE + 4 else (time.sleep(GRACE + 5), totp.now())[1]
        started = time.monotonic()
        slow = client.tunnel("alice", keys["alice"], f"127.0.0.2:{echo_server}", code)
        took = time.monotonic() - started
        assert slow.stdout == b"ping\n", slow.stderr
        assert took > GRACE + 2, took  # the answer really came after the login grace

        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:  # no key, no version even
            started = time.monotonic()
            silent.settimeout(GRACE + 20)
            while silent.recv(4096):
                pass
            assert time.monotonic() - started < GRACE + 15  # cut off by the 3 s grace, not the code's 120 s
    finally:
        proc.terminate()
        proc.wait(timeout=30)
