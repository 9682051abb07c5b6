"""The IGNORE-packet tuning: data through a tunnel arrives intact and in about half the packets."""

import asyncio
import hashlib

import asyncssh

from bastion import asyncssh_tuning
from asyncssh import connection


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username):
        return False  # no auth: this test is about the transport

    def connection_requested(self, *args):
        return True


def test_bulk_data_intact_with_one_write_per_data_packet():
    assert asyncssh_tuning.apply()
    writes = 0
    original_send = connection.SSHConnection._send

    def counting_send(self, data):
        nonlocal writes
        if isinstance(self, asyncssh.SSHServerConnection):
            writes += 1
        return original_send(self, data)

    payload = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB

    async def scenario():
        key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key])

        async def source(reader, writer):
            writer.write(payload)
            await writer.drain()
            writer.close()

        target = await asyncio.start_server(source, "127.0.0.1", 0)
        async with asyncssh.connect("127.0.0.1", server.sockets[0].getsockname()[1], known_hosts=None,
                                    username="u", encryption_algs=["aes128-gcm@openssh.com"]) as conn:
            reader, _ = await conn.open_connection("127.0.0.1", target.sockets[0].getsockname()[1])
            received = await reader.read()
        server.close()
        target.close()
        return received

    connection.SSHConnection._send = counting_send
    try:
        received = asyncio.run(scenario())
    finally:
        connection.SSHConnection._send = original_send
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    data_packets = len(payload) // 32768
    # untuned asyncssh writes an IGNORE before each data packet: about 2 x data_packets
    assert writes < data_packets * 1.2 + 40, (writes, data_packets)
