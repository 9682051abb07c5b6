# This file patches functions of asyncssh 2.24.1 (connection.py, channel.py) with adapted copies,
# Copyright (c) 2013-2026 by Ron Frederick <ronf@timeheart.net> and others,
# and is made available under the same terms as asyncssh:
# SPDX-License-Identifier: EPL-2.0 OR GPL-2.0-or-later
"""The fast path's pins and its one switch: which asyncssh functions it replaces or relies on, the digest of
each one's source in the asyncssh it was written for, and `apply`, which swaps the replacements in only when
every digest matches (else asyncssh runs as shipped, with a warning).

The fast path (issue #6) does less Python work and fewer copies per SSH packet on asyncssh's byte path; a
tunnel moves 32 KiB channel-data packets, and the bulk-tunnel profile put most of the server's time into
per-packet work, not AES. By job: send.py (building, sealing and writing packets), receive.py (parsing and
opening them, channel data to the channel), in_place.py (the socket reads into the connection's buffer),
keepalive.py (a timer per interval, not per read), aead.py (AES-GCM and chacha20-poly1305@openssh.com seal
and open, pure) and keys.py (the AEAD objects kept per key). The wire format is unchanged; everything else
(kex, rekeying, deferral, strict kex, compression, other ciphers) follows asyncssh's code. Off with
`fast_path = false` in config.toml (BASTION_FAST_PATH=false), e.g. for comparison runs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from typing import Callable

from . import in_place, keepalive, receive, send

log = logging.getLogger("bastion.tuning")

# sha256 (first 16 hex digits) of the source of each asyncssh function replaced here or relied on, as in
# asyncssh 2.24.1 (the version this was written and measured against).
VERIFIED_VERSIONS = ("2.24.1",)
_EXPECTED_SOURCE = {
    "connection.SSHConnection.send_packet": "fb9da7bec6dd395a",
    "connection.SSHConnection.data_received": "b2d14a83b2604db6",
    "connection.SSHConnection._recv_version": "05573b0ac8886bf3",
    "connection.SSHConnection._recv_data": "fc4e0735191bb0fd",
    "connection.SSHConnection._recv_pkthdr": "7adc4d88fe20593c",
    "connection.SSHConnection._recv_packet": "b3daa22e9763eee9",
    "connection.SSHConnection._finish_recv_packet": "e12d96db58b3524e",
    "connection.SSHConnection._reset_keepalive_timer": "7a9157707c514524",
    "connection.SSHConnection._set_keepalive_timer": "23a054202a1cb32b",
    "connection.SSHConnection._cancel_keepalive_timer": "d812058ddd18253c",
    "connection.SSHConnection._keepalive_timer_callback": "6d8aa6656cfc6003",
    "channel.SSHChannel.send_packet": "00e81b763c8f3dd2",
    "channel.SSHChannel._flush_send_buf": "3f11e9dc27c58b18",
    "channel.SSHChannel.write": "1045e20008469933",
    "channel.SSHChannel._process_data": "342490795c4b893c",
    "channel.SSHChannel._accept_data": "33121e9e185c9850",
    "channel.SSHChannel._deliver_data": "bd94ccbaa59ab510",
    "packet.SSHPacketHandler.process_packet": "490a59d971d0ce03",
    "crypto.cipher.GCMCipher.encrypt_and_sign": "adb87dbdb4f9039a",
    "crypto.cipher.GCMCipher.verify_and_decrypt": "c09eb5b36d0f6a92",
    "crypto.cipher.GCMCipher._update_iv": "bce250a8d9dc82b6",
    "encryption.GCMEncryption.decrypt_packet": "6feb840baa1102a4",
    "encryption.GCMEncryption.decrypt_header": "50d9112c6d6c1ced",
    "connection.SSHConnection._send": "c6698a37eb80f574",
    "channel.SSHChannel._pause_resume_writing": "b05e507ca9fdeec9",
    "crypto.chacha.ChachaCipher.encrypt_and_sign": "f9b87e5614981c32",
    "crypto.chacha.ChachaCipher.verify_and_decrypt": "0ab7b7420976f2f6",
    "crypto.chacha.ChachaCipher.decrypt_header": "44feda66527a87d0",
    "encryption.ChachaEncryption.encrypt_packet": "e9faafa35d664508",
    "encryption.ChachaEncryption.decrypt_packet": "6b65743ce728dfd4",
}


def source_digests() -> dict[str, str]:
    """Digest of each function this module replaces, as installed (used to pin the versions checked)."""
    digests = {}
    for dotted in _EXPECTED_SOURCE:
        module_name, class_name, func_name = dotted.rsplit(".", 2)
        module = __import__(f"asyncssh.{module_name}", fromlist=[class_name])
        func = getattr(getattr(module, class_name), func_name)
        func = getattr(func, "_bastion_original", func)
        try:
            source = inspect.getsource(func)
        except (OSError, TypeError):
            source = ""
        digests[dotted] = hashlib.sha256(source.encode()).hexdigest()[:16]
    return digests


def changed_functions() -> list[str]:
    """The replaced or relied-on asyncssh functions whose installed source differs from the pinned one."""
    return [name for name, digest in source_digests().items() if digest != _EXPECTED_SOURCE[name]]


def apply() -> bool:
    """Install the fast path once; returns whether it is active (see `bastion.transport.install`)."""
    import asyncssh
    from asyncssh import channel, connection

    if getattr(connection.SSHConnection.send_packet, "_bastion_original", None):
        return True
    changed = changed_functions()
    if changed:
        log.warning("asyncssh %s differs from the version the fast path was written for (%s); "
                    "running asyncssh as shipped", asyncssh.__version__, ", ".join(changed))
        return False
    _patch(connection.SSHConnection, "send_packet", send._send_packet)
    _patch(connection.SSHConnection, "data_received", in_place._data_received)
    _patch(connection.SSHConnection, "_recv_version", receive._recv_version)
    _patch(connection.SSHConnection, "_recv_data", receive._recv_data)
    _patch(connection.SSHConnection, "_recv_pkthdr", receive._recv_pkthdr)
    _patch(connection.SSHConnection, "_recv_packet", receive._recv_packet)
    connection.SSHConnection._inpos = 0  # read offset into _inpbuf; an instance attribute once set
    connection.SSHConnection._inpend = 0  # end of what has arrived in _inpbuf (see receive_in_place)
    connection.SSHConnection._inpview = None  # a view of _inpbuf while it is an in-place receive buffer
    connection.SSHConnection._bastion_bytes_only = False  # no in-place buffer could be had (see get_buffer)
    _patch(connection.SSHConnection, "_reset_keepalive_timer", keepalive._reset_keepalive_timer)
    _patch(connection.SSHConnection, "_keepalive_timer_callback", keepalive._keepalive_timer_callback)
    connection.SSHConnection._keepalive_seen = 0.0  # loop time of the last read while the timer runs
    connection.SSHConnection._bastion_cork = None  # a list while a channel flush gathers its packets
    connection.SSHConnection._bastion_read_done = None  # a list while a read is processed (see after_read)
    _patch(channel.SSHChannel, "send_packet", send._channel_send_packet)
    _patch(channel.SSHChannel, "_flush_send_buf", send._flush_send_buf)
    _patch(channel.SSHChannel, "write", send._channel_write)
    return True


def _patch(cls: type, name: str, replacement: Callable) -> None:
    original = getattr(cls, name)
    functools.update_wrapper(replacement, original, assigned=("__doc__",), updated=())
    replacement._bastion_original = original  # type: ignore[attr-defined]
    setattr(cls, name, replacement)
