"""transport/security_keys.py (#21): with the hook applied, a server object with `security_key_signed` is handed the
flags and counter of each security-key signature that verified, and its False refuses the login. A real asyncssh
server and client on loopback; the client's key is a software sk-ssh-ed25519 key that signs as OpenSSH's
PROTOCOL.u2f says an authenticator does -- Ed25519 over SHA256(application) || flags || counter || SHA256(data) --
with the flags the test chooses, and can lie about them on the wire afterwards."""

from __future__ import annotations

import asyncio
from hashlib import sha256

import asyncssh
import pytest
from asyncssh.packet import Byte, String, UInt32
from asyncssh.sk_eddsa import _SKEd25519Key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bastion.transport import security_keys

APPLICATION = "ssh:"


class SoftwareSecurityKey(_SKEd25519Key):
    """An sk-ssh-ed25519 key whose "authenticator" is this object: it signs with `flags` and `counter`, and sends
    `sent_flags` (default: the same) in the signature blob."""

    def __init__(self, flags: int, counter: int = 7, sent_flags: int | None = None):
        self._private = Ed25519PrivateKey.generate()
        public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        super().__init__(public, APPLICATION, flags=0, key_handle=b"software", reserved=b"")
        self._sign_flags, self._counter = flags, counter
        self._sent_flags = flags if sent_flags is None else sent_flags

    def sign_ssh(self, data: bytes, sig_algorithm: bytes) -> bytes:
        signed = (sha256(APPLICATION.encode()).digest() + Byte(self._sign_flags) + UInt32(self._counter)
                  + sha256(data).digest())
        return String(self._private.sign(signed)) + Byte(self._sent_flags) + UInt32(self._counter)


class Server(asyncssh.SSHServer):
    def __init__(self, key: asyncssh.SSHKey, answer: bool | None, seen: list):
        self.key, self.answer, self.seen = key, answer, seen
        if answer is None:  # an owner without the callback: asyncssh's own behaviour
            self.security_key_signed = None

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return key.public_data == self.key.public_data

    def security_key_signed(self, username: str, key: asyncssh.SSHKey, flags: int, counter: int) -> bool:
        self.seen.append((username, key.get_fingerprint("sha256"), flags, counter))
        return bool(self.answer)


def login(client_key: asyncssh.SSHKey, answer: bool | None) -> tuple[bool, list]:
    """Log in as alice with `client_key`; the server's callback answers `answer`. (logged in, what it saw)."""
    assert security_keys.apply() and security_keys.apply()  # idempotent
    assert security_keys.installed()
    seen: list = []

    async def scenario() -> bool:
        server = await asyncssh.create_server(lambda: Server(client_key, answer, seen), "127.0.0.1", 0,
                                              server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncssh.connect("127.0.0.1", port, username="alice", known_hosts=None,
                                        client_keys=[client_key], agent_path=None, preferred_auth="publickey"):
                return True
        except asyncssh.PermissionDenied:
            return False
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(asyncio.wait_for(scenario(), 20)), seen


@pytest.mark.parametrize("flags", [0x01, 0x05, 0x04, 0x00])
def test_the_owner_sees_the_flags_and_counter_and_decides(flags):
    key = SoftwareSecurityKey(flags, counter=41)
    logged_in, seen = login(key, True)
    assert logged_in  # touch or not: the owner decides, not asyncssh's built-in touch check
    assert seen == [("alice", key.get_fingerprint("sha256"), flags, 41)]
    refused, seen = login(SoftwareSecurityKey(flags), False)
    assert not refused and [entry[2] for entry in seen] == [flags]


@pytest.mark.parametrize("signed, sent", [(0x01, 0x05), (0x00, 0x01), (0x05, 0x01)])
def test_flags_changed_after_signing_fail_the_signature_and_never_reach_the_owner(signed, sent):
    logged_in, seen = login(SoftwareSecurityKey(signed, sent_flags=sent), True)
    assert not logged_in and seen == []


def test_without_the_callback_asyncssh_still_requires_touch():
    assert login(SoftwareSecurityKey(0x01), None)[0]
    assert not login(SoftwareSecurityKey(0x00), None)[0]


def test_other_keys_never_reach_the_callback():
    logged_in, seen = login(asyncssh.generate_private_key("ssh-ed25519"), False)
    assert logged_in and seen == []


def test_signature_fields_of_hostile_blobs():
    assert security_keys.signature_fields(b"") is None
    assert security_keys.signature_fields(String(b"sk-ssh-ed25519@openssh.com") + String(b"x")) is None
    blob = String(b"sk-ssh-ed25519@openssh.com") + String(b"x" * 64) + Byte(5) + UInt32(9)
    assert security_keys.signature_fields(blob) == (b"sk-ssh-ed25519@openssh.com", 5, 9)
    assert security_keys.key_algorithm(b"\xff\xff") == b""
