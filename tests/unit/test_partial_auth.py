"""transport/partial_auth.py on its own, with asyncssh's own client and server on loopback (#21): a server whose
`more_auth_required` says yes after the key answers with partial success and offers keyboard-interactive next; one
without the callback (or saying no) logs the user in as asyncssh always has."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from bastion.transport import partial_auth


class Server(asyncssh.SSHServer):
    """Accepts `key` for anyone; wants the code "123456" after it when `second` is set."""

    def __init__(self, key: asyncssh.SSHKey, second: bool, events: list[str]):
        self.key, self.second, self.events = key, second, events
        self.key_done = self.code_done = False
        self.tries = 0

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return not self.key_done

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return key.public_data == self.key.public_data

    def kbdint_auth_supported(self) -> bool:
        return self.key_done and not self.code_done and self.tries < 1  # one try, then no method is left

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str):
        return "", "", "", (("Verification code: ", False),)

    def validate_kbdint_response(self, username: str, responses) -> bool:
        self.events.append(f"code {responses[0]}")
        self.tries += 1
        self.code_done = list(responses) == ["123456"]
        return self.code_done

    async def more_auth_required(self, username: str, method: str) -> bool:  # a coroutine works too
        self.events.append(f"succeeded {method}")
        if method == "publickey" and self.second:
            self.key_done = True
            return True
        return False

    def auth_completed(self) -> None:
        self.events.append("logged in")


class Client(asyncssh.SSHClient):
    def __init__(self, answer: str, prompts: list[str]):
        self.answer, self.prompts = answer, prompts

    def kbdint_auth_requested(self) -> str:
        return ""

    def kbdint_challenge_received(self, name, instructions, lang, prompts):
        self.prompts += [prompt for prompt, _echo in prompts]
        return [self.answer] if prompts else []


async def login(second: bool, answer: str) -> tuple[bool, list[str], list[str]]:
    assert partial_auth.apply()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    events: list[str] = []
    prompts: list[str] = []
    server = await asyncssh.create_server(lambda: Server(user_key, second, events), "127.0.0.1", 0,
                                          server_host_keys=[host_key], kbdint_auth=True, password_auth=False)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await asyncio.wait_for(asyncssh.connect(
            "127.0.0.1", port, username="alice", known_hosts=None, client_keys=[user_key],
            client_factory=lambda: Client(answer, prompts), preferred_auth=["publickey", "keyboard-interactive"]),
            timeout=10)
    except asyncssh.PermissionDenied:
        return False, events, prompts
    finally:
        server.close()
    conn.close()
    await conn.wait_closed()
    return True, events, prompts


def test_partial_success_then_the_code():
    ok, events, prompts = asyncio.run(login(second=True, answer="123456"))
    assert ok and prompts == ["Verification code: "]
    assert events == ["succeeded publickey", "code 123456", "succeeded keyboard-interactive", "logged in"]


def test_a_wrong_code_is_no_login():
    ok, events, prompts = asyncio.run(login(second=True, answer="000000"))
    assert not ok and "logged in" not in events and events[:2] == ["succeeded publickey", "code 000000"]


def test_without_a_second_method_the_key_logs_in_as_before():
    ok, events, prompts = asyncio.run(login(second=False, answer=""))
    assert ok and prompts == [] and events == ["succeeded publickey", "logged in"]


def test_apply_is_idempotent():
    assert partial_auth.apply() and partial_auth.apply() and partial_auth.installed()
    assert getattr(asyncssh.auth.ServerAuth.send_success, "__wrapped__", None) is not None


@pytest.fixture(autouse=True)
def _patched():
    partial_auth.apply()
