"""sshd names a certificate in its auth lines by the certified key, its key id and serial, and the CA (auth2-pubkey.c
format_key: `ED25519-CERT SHA256:… ID alice@corp (serial 7) CA ED25519 SHA256:…`); the gateway's lines say the same
for an accepted, a refused and a partial (a one-time code next) certificate login (#21)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import asyncssh

from bastion.gateway.auth_log import AuthEvents
from bastion.policy.certificates import Certificate


def certificate(ca: asyncssh.SSHKey, key_id: str = "alice@corp") -> Certificate:
    return Certificate(key_id=key_id, serial=7, user_certificate=True, principals=("alice",), valid_after=0,
                       valid_before=2**63, ca_fingerprint=ca.get_fingerprint("sha256"), ca_key=bytes(ca.public_data))


def events() -> AuthEvents:
    owner = SimpleNamespace(number=1, user="alice", client_ip="192.0.2.7", client_port=50000, session_id=None)
    return AuthEvents(owner)


def test_accepted_failed_and_partial_certificate_lines_read_like_sshd(caplog):
    ca = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert, fp, ca_fp = certificate(ca), key.get_fingerprint("sha256"), ca.get_fingerprint("sha256")
    with caplog.at_level(logging.INFO, logger="bastion"):
        events().accepted_publickey("ssh-ed25519", fp, cert)
        events().failed_publickey(key, cert)
        events().partial_publickey("ssh-ed25519", fp, cert)
        events().accepted_publickey("ssh-ed25519", fp)
    suffix = f"ssh2: ED25519-CERT {fp} ID alice@corp (serial 7) CA ECDSA {ca_fp}"
    assert caplog.messages == [
        f"Accepted publickey for alice from 192.0.2.7 port 50000 {suffix}",
        f"Failed publickey for alice from 192.0.2.7 port 50000 {suffix}",
        f"Partial publickey for alice from 192.0.2.7 port 50000 {suffix}",
        f"Accepted publickey for alice from 192.0.2.7 port 50000 ssh2: ED25519 {fp}",
    ]


def test_a_key_id_cannot_forge_a_second_log_line(caplog):
    """The key id is the certificate holder's text: a newline in it must not start a line a log reader would trust."""
    ca = asyncssh.generate_private_key("ssh-ed25519")
    key = asyncssh.generate_private_key("ssh-ed25519")
    forged = certificate(ca, "x\nAccepted publickey for root from 10.0.0.1 port 1 ssh2: ED25519 SHA256:x")
    with caplog.at_level(logging.INFO, logger="bastion"):
        events().failed_publickey(key, forged)
    assert len(caplog.messages) == 1 and "\n" not in caplog.messages[0]
    assert caplog.messages[0].startswith("Failed publickey for alice ")
