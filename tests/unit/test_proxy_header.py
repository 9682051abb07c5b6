"""The PROXY protocol header parser (bastion/policy/proxy_header.py, #22): the spec's cases in tables, and
hypothesis for what a hostile or broken peer can send: never an exception but ProxyHeaderError, every true
prefix of a valid header asks for more bytes, nothing longer than the limit is waited for."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from bastion.policy.proxy_header import (MAX_LENGTH, V1_MAX_LENGTH, V2_SIGNATURE, ProxyHeader, ProxyHeaderError,
                                         parse, starts_like_header, v2_header)

SIG = V2_SIGNATURE


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + len(block).to_bytes(2, "big") + block


IPV4_BLOCK = bytes([10, 1, 2, 3, 10, 0, 0, 1]) + (5555).to_bytes(2, "big") + (22).to_bytes(2, "big")
IPV6_BLOCK = (ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("2001:db8::1").packed
              + (5555).to_bytes(2, "big") + (22).to_bytes(2, "big"))


@pytest.mark.parametrize("data, expected", [
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 22\r\nSSH-2.0-x\r\n",
     ProxyHeader(1, 38, "TCP4", ("10.1.2.3", 5555), ("10.0.0.1", 22))),
    (b"PROXY TCP6 2001:db8::7 2001:DB8::1 5555 22\r\n",
     ProxyHeader(1, 44, "TCP6", ("2001:db8::7", 5555), ("2001:db8::1", 22))),
    (b"PROXY TCP6 ::ffff:10.1.2.3 ::1 0 65535\r\n",
     ProxyHeader(1, 40, "TCP6", ("::ffff:a01:203", 0), ("::1", 65535))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, 15, "UNKNOWN")),
    (b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n", ProxyHeader(1, 43, "UNKNOWN")),
    (v2(0x21, 0x11, IPV4_BLOCK) + b"SSH", ProxyHeader(2, 28, "TCP4", ("10.1.2.3", 5555), ("10.0.0.1", 22))),
    (v2(0x21, 0x21, IPV6_BLOCK), ProxyHeader(2, 52, "TCP6", ("2001:db8::7", 5555), ("2001:db8::1", 22))),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x04\x00\x00" + b"\x05\x00\x03abc" + b"\xea\x00\x01z"),
     ProxyHeader(2, 41, "TCP4", ("10.1.2.3", 5555), ("10.0.0.1", 22))),  # NOOP, UNIQUE_ID, AWS: skipped
    (v2(0x20, 0x00, b""), ProxyHeader(2, 16, "LOCAL")),
    (v2(0x20, 0x11, IPV4_BLOCK), ProxyHeader(2, 28, "LOCAL")),  # LOCAL: the block is skipped whatever it holds
    (v2(0x20, 0x00, b"junk"), ProxyHeader(2, 20, "LOCAL")),
    (v2(0x21, 0x00, b"ignored"), ProxyHeader(2, 23, "UNSPEC")),
    (v2(0x21, 0x10, IPV4_BLOCK), ProxyHeader(2, 28, "UNSPEC")),  # INET over an unspecified transport
    (v2(0x21, 0x12, IPV4_BLOCK), ProxyHeader(2, 28, "UDP4")),
    (v2(0x21, 0x31, bytes(216)), ProxyHeader(2, 232, "UNIX")),
], ids=["v1 TCP4", "v1 TCP6", "v1 TCP6 mapped", "v1 UNKNOWN", "v1 UNKNOWN long", "v2 TCP4", "v2 TCP6",
        "v2 TLVs", "v2 LOCAL", "v2 LOCAL with block", "v2 LOCAL junk", "v2 UNSPEC", "v2 INET unspec",
        "v2 UDP", "v2 UNIX"])
def test_valid_headers(data, expected):
    assert parse(data) == expected
    assert expected.local == (expected.kind == "LOCAL")


@pytest.mark.parametrize("data, words", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "no PROXY header"),
    (b"GET / HTTP/1.1\r\n", "no PROXY header"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 22\n", "not ended by CRLF"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 22\rX", "not ended by CRLF"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 5555\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4  10.1.2.3 10.0.0.1 5555 22\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY TCP5 10.1.2.3 10.0.0.1 5555 22\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY UNKNOWNX\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 10.01.2.3 10.0.0.1 5555 22\r\n", "not a valid TCP4 address"),
    (b"PROXY TCP4 2001:db8::1 10.0.0.1 5555 22\r\n", "not a valid TCP4 address"),
    (b"PROXY TCP6 10.1.2.3 ::1 5555 22\r\n", "not a valid TCP6 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 5555 22\r\n", "not a valid TCP6 address"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 05555 22\r\n", "leading zeros"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 65536 22\r\n", "0..65535"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 -1 22\r\n", "0..65535"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 +1 22\r\n", "0..65535"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 \xd9\xa1 22\r\n", "printable ASCII"),
    (b"PROXY " + b"x" * 101 + b"\r\n", "longer than 107"),
    (b"PROXY " + b"x" * 200, "longer than 107"),
    (v2(0x11, 0x11, IPV4_BLOCK), "version 1"),
    (v2(0x22, 0x11, IPV4_BLOCK), "unassigned command 2"),
    (v2(0x21, 0x41, IPV4_BLOCK), "unassigned family/protocol byte 0x41"),
    (v2(0x21, 0x13, IPV4_BLOCK), "unassigned family/protocol byte 0x13"),
    (v2(0x21, 0x11, IPV4_BLOCK[:11]), "INET address block of 11 bytes, shorter than 12"),
    (v2(0x21, 0x21, IPV4_BLOCK), "INET6 address block of 12 bytes, shorter than 36"),
    (v2(0x21, 0x31, bytes(100)), "UNIX address block of 100 bytes"),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x05\x00"), "ends inside a TLV"),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x05\x00\x09abc"), "TLV longer than the header"),
    (SIG + b"\x21\x11\xff\xff", "of 65551 bytes, more than the 4096 allowed"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_headers(data, words):
    with pytest.raises(ProxyHeaderError, match=None) as error:
        parse(data)
    assert words in str(error.value)


def test_the_length_limit_refuses_before_the_bytes_arrive():
    header = v2(0x21, 0x11, IPV4_BLOCK + b"\x04" + (100).to_bytes(2, "big") + bytes(100))
    assert parse(header, max_length=len(header)).kind == "TCP4"
    with pytest.raises(ProxyHeaderError, match="of 131 bytes, more than the 130 allowed"):
        parse(header[:16], max_length=len(header) - 1)


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 22\r\n", b"PROXY UNKNOWN\r\n", v2(0x21, 0x21, IPV6_BLOCK),
    v2(0x20, 0x00, b""), v2(0x21, 0x11, IPV4_BLOCK + b"\x05\x00\x03abc"),
])
def test_every_true_prefix_asks_for_more(header):
    for end in range(len(header)):
        assert parse(header[:end]) is None, header[:end]
    assert parse(header).length == len(header)


@pytest.mark.parametrize("data, verdict", [
    (b"", None), (b"P", None), (b"PROXY", None), (b"PROXY ", True), (b"\r\n\r\n\x00\r\nQUI", None), (SIG, True),
    (b"SSH-2.0-", False), (b"S", False), (b"\r\n\r\n\x01", False), (b"PROXZ", False), (b"\n", False),
])
def test_starts_like_header(data, verdict):
    assert starts_like_header(data) is verdict


# ---- hypothesis: what a hostile or broken peer can send ------------------------------------------------------

def _outcome(data: bytes, max_length: int = MAX_LENGTH):
    try:
        header = parse(data, max_length)
    except ProxyHeaderError as exc:
        assert str(exc)
        return "error"
    if header is not None:
        assert 16 <= header.length <= min(len(data), max_length) if header.version == 2 else \
            header.length <= min(len(data), V1_MAX_LENGTH)
        if header.source is not None:
            ipaddress.ip_address(header.source[0])
            assert 0 <= header.source[1] <= 65535
    return header


@given(st.binary(max_size=600))
def test_any_bytes(data):
    _outcome(data)


@given(st.sampled_from([b"PROXY ", SIG, SIG + b"\x21", SIG + b"\x21\x11", SIG + b"\x20"]), st.binary(max_size=300),
       st.integers(min_value=16, max_value=5000))
def test_any_bytes_after_a_signature(prefix, rest, max_length):
    _outcome(prefix + rest, max_length)


@given(st.text(alphabet="PROXYTCP46UNKWabcdef0123456789.: \r\n", max_size=120))
def test_text_that_looks_like_v1(text):
    _outcome(text.encode())


_tlv = st.builds(lambda t, v: bytes([t]) + len(v).to_bytes(2, "big") + v, st.integers(0, 255),
                 st.binary(max_size=40))


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535), st.integers(0, 65535),
       st.lists(_tlv, max_size=4), st.binary(max_size=30))
def test_v2_round_trip_and_prefixes(address, sport, dport, tlvs, after):
    destination = "0.0.0.0" if address.version == 4 else "::"
    header = v2_header((str(address), sport), (destination, dport), b"".join(tlvs))
    parsed = parse(header + after)
    assert parsed.source == (str(address), sport) and parsed.destination == (destination, dport)
    assert parsed.length == len(header) and parsed.kind == f"TCP{address.version}"
    for end in range(0, len(header), 7):
        assert parse(header[:end]) is None


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.ip_addresses(v=4), st.integers(0, 65535),
       st.integers(0, 65535), st.binary(max_size=30))
def test_v1_round_trip_and_prefixes(source, destination, sport, dport, after):
    kind = f"TCP{source.version}"
    dst = str(destination) if source.version == 4 else str(ipaddress.IPv6Address(b"\0" * 12 + destination.packed))
    line = f"PROXY {kind} {source} {dst} {sport} {dport}\r\n".encode()
    parsed = parse(line + after)
    assert parsed == ProxyHeader(1, len(line), kind, (str(source), sport), (dst, dport))
    for end in range(len(line)):
        assert parse(line[:end]) is None


@given(st.sampled_from([v2(0x21, 0x11, IPV4_BLOCK + b"\x05\x00\x03abc"), v2(0x21, 0x21, IPV6_BLOCK),
                        b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 22\r\n"]),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_headers(header, flips):
    data = bytearray(header)
    for position, value in flips:
        data[position % len(data)] = value
    _outcome(bytes(data))
