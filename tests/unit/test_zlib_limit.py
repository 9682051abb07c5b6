"""A zlib@openssh.com packet inflates to at most the packet limit (bastion/transport/zlib_limit.py), on asyncssh's own
compressor and decompressor: a full-size packet passes and the stream goes on; one byte more is an error."""

from __future__ import annotations

import os

import pytest
from asyncssh.compression import get_compressor, get_decompressor
from asyncssh.misc import CompressionError

from bastion.transport import zlib_limit

LIMIT = zlib_limit.MAX_PAYLOAD


@pytest.fixture
def pair():
    zlib_limit.apply()
    return get_compressor(b"zlib@openssh.com"), get_decompressor(b"zlib@openssh.com")


def test_packets_up_to_the_limit_inflate_and_the_stream_goes_on(pair):
    compressor, decompressor = pair
    for payload in (bytes(LIMIT), os.urandom(LIMIT), b"small", bytes(LIMIT)):
        assert decompressor.decompress(compressor.compress(payload)) == payload


def test_one_byte_past_the_limit_is_a_compression_error(pair):
    compressor, decompressor = pair
    with pytest.raises(CompressionError, match=f"exceeds {LIMIT} bytes"):
        decompressor.decompress(compressor.compress(bytes(LIMIT + 1)))


def test_a_corrupt_stream_is_still_reported_as_asyncssh_does(pair):
    _, decompressor = pair
    assert decompressor.decompress(b"\xff" * 64) is None  # asyncssh: "Decompression failed"
