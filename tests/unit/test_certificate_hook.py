"""transport/certificates.py (#21): with the hook applied, a server object with `examine_certificate` sees each user
certificate offered, as plain values, before asyncssh's own checks, and its False refuses the certificate. A real
asyncssh server and client on loopback: the unit is the hook into asyncssh's connection."""

from __future__ import annotations

import asyncio
from ipaddress import ip_network

import asyncssh
import pytest

from bastion.policy.certificates import Certificate
from bastion.transport import certificates


class Server(asyncssh.SSHServer):
    def __init__(self, answer: bool, seen: list):
        self.answer, self.seen, self.ca = answer, seen, None

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def examine_certificate(self, username: str, certificate: Certificate, key: asyncssh.SSHKey) -> bool:
        self.seen.append((username, certificate, key.get_fingerprint("sha256")))
        self.ca = certificate.ca_fingerprint if self.answer else None
        return self.answer

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return key.get_fingerprint("sha256") == self.ca


def login(answer: bool, cert_for) -> tuple[bool, list]:
    """Log in as alice with a certificate `cert_for(ca, user_key)`; returns (logged in, what the server saw)."""
    assert certificates.apply() and certificates.apply()  # idempotent
    ca, user_key = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    cert = cert_for(ca, user_key)
    seen: list = []

    async def scenario() -> bool:
        server = await asyncssh.create_server(lambda: Server(answer, seen), "127.0.0.1", 0,
                                              server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncssh.connect("127.0.0.1", port, username="alice", known_hosts=None,
                                        client_keys=[(user_key, cert)], agent_path=None, preferred_auth="publickey"):
                return True
        except asyncssh.PermissionDenied:
            return False
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(asyncio.wait_for(scenario(), 20)), [(ca, user_key, *entry) for entry in seen]


def test_the_server_sees_the_certificate_as_plain_values_and_may_accept_it():
    logged_in, seen = login(True, lambda ca, key: ca.generate_user_certificate(
        key, "alice@corp", serial=9, principals=["alice", "ops"], valid_after=1_700_000_000,
        valid_before=4_000_000_000, source_address=["10.0.0.0/8", "127.0.0.1/32"], permit_pty=False))
    assert logged_in and seen
    ca, user_key, username, certificate, fingerprint = seen[-1]
    assert username == "alice" and fingerprint == user_key.get_fingerprint("sha256")
    assert certificate == Certificate(
        key_id="alice@corp", serial=9, user_certificate=True, principals=("alice", "ops"), valid_after=1_700_000_000,
        valid_before=4_000_000_000, ca_fingerprint=ca.get_fingerprint("sha256"), critical_options=("source-address",),
        source_addresses=(ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32")),
        extensions=frozenset({"permit-X11-forwarding", "permit-agent-forwarding", "permit-port-forwarding",
                              "permit-user-rc"}),
        ca_key=bytes(ca.public_data))  # (#21) for revocation of the CA by key or hash


@pytest.mark.parametrize("host", [False, True])
def test_a_certificate_the_server_refuses_does_not_log_in(host):
    def make(ca, key):
        if host:
            return ca.generate_host_certificate(key, "alice@corp", principals=["alice"])
        return ca.generate_user_certificate(key, "alice@corp", principals=["alice"])
    logged_in, seen = login(False, make)
    assert not logged_in
    assert [entry[3].user_certificate for entry in seen] == [not host]  # asked once; the client gives up on it
