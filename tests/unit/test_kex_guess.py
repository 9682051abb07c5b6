"""RFC 4253 §7's rule for a guessed first kex packet (bastion/transport/kex_guess.py): the table of cases, and a real
dropbear dbclient, which sends such a guess, logging in to an asyncssh server on loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import asyncssh
import pytest
from asyncssh.constants import MSG_KEXINIT
from asyncssh.packet import Boolean, Byte, NameList, UInt32

from bastion.transport import kex_guess

# What dropbear 2022.83's dbclient and the bastion put first (and a little more) in their KEXINITs.
DROPBEAR_KEX = [b"curve25519-sha256", b"curve25519-sha256@libssh.org", b"diffie-hellman-group14-sha256"]
DROPBEAR_HOST_KEYS = [b"ssh-ed25519", b"ecdsa-sha2-nistp256", b"rsa-sha2-256"]
BASTION_KEX = [b"mlkem768x25519-sha256", b"curve25519-sha256", b"curve25519-sha256@libssh.org"]
BASTION_HOST_KEYS = [b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256"]


@pytest.mark.parametrize(
    "client_kex, client_host_keys, server_kex, server_host_keys, wrong",
    [
        # dbclient against the bastion: curve25519 is negotiated, but the server prefers mlkem: wrong
        # (asyncssh's own rule, "negotiated == client's first", called this right)
        (DROPBEAR_KEX, DROPBEAR_HOST_KEYS, BASTION_KEX, BASTION_HOST_KEYS, True),
        # same preferred kex and host key: right
        (DROPBEAR_KEX, DROPBEAR_HOST_KEYS, DROPBEAR_KEX, [b"ssh-ed25519"], False),
        # same preferred kex, different preferred host key: wrong
        (DROPBEAR_KEX, DROPBEAR_HOST_KEYS, DROPBEAR_KEX, [b"rsa-sha2-512", b"ssh-ed25519"], True),
        # the client's first kex is one the server lacks: wrong
        ([b"sntrup761x25519-sha512@openssh.com"] + DROPBEAR_KEX, DROPBEAR_HOST_KEYS, DROPBEAR_KEX,
         DROPBEAR_HOST_KEYS, True),
        # an empty list has no preferred algorithm: wrong
        ([], DROPBEAR_HOST_KEYS, DROPBEAR_KEX, DROPBEAR_HOST_KEYS, True),
    ],
)
def test_guess_is_right_only_when_both_preferred_algorithms_match(client_kex, client_host_keys, server_kex,
                                                                  server_host_keys, wrong):
    assert kex_guess.guess_was_wrong(client_kex, client_host_keys, server_kex, server_host_keys) is wrong


@pytest.mark.parametrize("follows", [True, False])
def test_a_kexinit_is_read_back(follows):
    lists = [NameList(DROPBEAR_KEX), NameList(DROPBEAR_HOST_KEYS)] + [NameList([b"x"])] * 6 + [NameList([])] * 2
    payload = b"".join([Byte(MSG_KEXINIT), os.urandom(16), *lists, Boolean(follows), UInt32(0)])
    assert kex_guess._read_kexinit(payload) == (DROPBEAR_KEX, DROPBEAR_HOST_KEYS, follows)


def test_apply_wraps_the_kexinit_handler_once():
    kex_guess.apply()
    handler = asyncssh.connection.SSHConnection._packet_handlers[MSG_KEXINIT]
    kex_guess.apply()
    assert asyncssh.connection.SSHConnection._packet_handlers[MSG_KEXINIT] is handler
    assert handler._bastion_kex_guess


DBCLIENT = shutil.which("dbclient")
DROPBEARCONVERT = shutil.which("dropbearconvert") or "/usr/lib/dropbear/dropbearconvert"


class _AnyKey(asyncssh.SSHServer):
    def begin_auth(self, username):
        return True

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        return True


@pytest.mark.skipif(DBCLIENT is None or not Path(DROPBEARCONVERT).exists(),
                    reason="needs dropbear's dbclient and dropbearconvert (Debian dropbear-bin)")
def test_dbclient_logs_in_when_its_guess_is_wrong(tmp_path):
    # 1. a dropbear-format client key, from ssh-keygen's
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "id"], check=True, timeout=10)
    subprocess.run([DROPBEARCONVERT, "openssh", "dropbear", tmp_path / "id", tmp_path / "id.db"], check=True,
                   capture_output=True, timeout=10)
    kex_guess.apply()

    commands = []

    def run_command(process):
        commands.append(process.command)
        process.exit(0)

    async def scenario():
        # 2. a server preferring mlkem768x25519 (dbclient guesses curve25519, which it also offers)
        server = await asyncssh.create_server(
            _AnyKey, "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            kex_algs=["mlkem768x25519-sha256", "curve25519-sha256"],
            process_factory=run_command)
        port = server.sockets[0].getsockname()[1]
        try:
            # 3. dbclient logs in and runs a command (-yy: no host key check for this throwaway key)
            proc = await asyncio.create_subprocess_exec(
                DBCLIENT, "-yy", "-i", str(tmp_path / "id.db"), "-p", str(port), "user@127.0.0.1", "true",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")})
            _, err = await asyncio.wait_for(proc.communicate(), 15)
            return proc.returncode, err.decode(errors="replace")
        finally:
            server.close()
            await server.wait_closed()

    code, err = asyncio.run(scenario())
    assert code == 0, err
    assert "Disconnect" not in err  # dbclient exits 0 even then
    assert commands == ["true"]
