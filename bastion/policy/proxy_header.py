"""The PROXY protocol header (HAProxy's doc/proxy-protocol.txt, versions 1 and 2) that a load balancer puts in
front of each connection it relays, saying whose connection it is. Pure parsing: bytes in, a ProxyHeader, "not
enough bytes yet" (None) or ProxyHeaderError out; never another exception, and never more than `max_length`
bytes looked at (tests/unit/test_proxy_header.py fuzzes both).

Written from the specification rather than taken from PyPI: the one package there (`proxy-protocol`) has had no
release since 2024, and it raises struct.error for a v2 address block shorter than its family needs and
accepts unassigned families; both would be holes in front of an authentication server.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN ffff:…:ffff ffff:…:ffff 65535 65535\r\n", the spec's worst case
# A v2 header may carry TLVs after the addresses (HAProxy's unique id, AWS's VPC endpoint id, …). The spec
# allows 16 + 65535 bytes; a few kilobytes hold any that a balancer in front of SSH sends.
MAX_LENGTH = 4096

_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
# family (high nibble) and transport (low nibble) of byte 14 -> a name, and the address block's size
_V2_FAMILIES = {0x0: ("UNSPEC", 0), 0x1: ("INET", 12), 0x2: ("INET6", 36), 0x3: ("UNIX", 216)}
_V2_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why, in a few words fit for a log line."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header. `source` is the client's (address, port) for a relayed TCP connection; None for a
    v2 LOCAL (the balancer's own connection, e.g. a health check: `local` is True) and for headers that name no
    TCP client (v1 UNKNOWN, v2 UNSPEC, UNIX or UDP: `kind` says which). `length` is how many bytes it took:
    what follows belongs to the SSH connection."""

    version: int
    length: int
    kind: str  # "TCP4", "TCP6", "LOCAL", "UNKNOWN", "UNIX", "UDP4", …
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None

    @property
    def local(self) -> bool:
        return self.kind == "LOCAL"


def starts_like_header(data: bytes) -> bool | None:
    """Whether `data`, the first bytes of a connection, begin with a PROXY header's signature (v1 or v2):
    True or False, or None while `data` is too short to tell. An SSH client's first bytes ("SSH-2.0-") tell
    at once."""
    for signature in (V1_PREFIX, V2_SIGNATURE):
        if data[:len(signature)] == signature[:len(data)]:
            return True if len(data) >= len(signature) else None
    return False


def parse(data: bytes, max_length: int = MAX_LENGTH) -> ProxyHeader | None:
    """The header at the start of `data`, or None if `data` is a true prefix of one (read more and call again);
    raises ProxyHeaderError as soon as the bytes cannot become a valid header, or the header would be longer
    than `max_length` bytes."""
    data = bytes(data[:max(max_length, V1_MAX_LENGTH) + 1])
    verdict = starts_like_header(data)
    if verdict is None:
        return None
    if not verdict:
        raise ProxyHeaderError("no PROXY header")
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data, max_length)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        head = data[:V1_MAX_LENGTH]
        if head.endswith(b"\r"):  # the CRLF may be split between two reads
            head = head[:-1]
        if b"\n" in head or b"\r" in head:
            raise ProxyHeaderError("PROXY v1 line not ended by CRLF")
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        if not _printable(head):
            raise ProxyHeaderError("PROXY v1 line is not printable ASCII")
        return None
    line = data[:end]
    if not _printable(line):
        raise ProxyHeaderError("PROXY v1 line is not printable ASCII")
    fields = line.decode("ascii").split(" ")
    length = end + 2
    if fields[1:2] == ["UNKNOWN"]:
        return ProxyHeader(version=1, length=length, kind="UNKNOWN")  # the rest of the line is to be ignored
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    kind, src, dst, sport, dport = fields[1:]
    return ProxyHeader(version=1, length=length, kind=kind,
                       source=(_v1_address(src, kind), _v1_port(sport)),
                       destination=(_v1_address(dst, kind), _v1_port(dport)))


def _printable(data: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in data)


def _v1_address(text: str, kind: str) -> str:
    try:
        if kind == "TCP4":
            return str(IPv4Address(text))  # refuses leading zeros, as the spec does
        if "%" in text:  # a zone id means nothing on the balancer's far side
            raise ValueError
        return str(IPv6Address(text))
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address {text[:40]!r} is not a valid {kind} address") from None


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {text[:8]!r} is not a number in 0..65535 without leading zeros")
    return int(text)


def _parse_v2(data: bytes, max_length: int) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version}")
    if command not in _V2_COMMANDS:
        raise ProxyHeaderError(f"PROXY v2 header with unassigned command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family not in _V2_FAMILIES or transport not in _V2_TRANSPORTS:
        raise ProxyHeaderError(f"PROXY v2 header with unassigned family/protocol byte 0x{data[13]:02x}")
    length = 16 + int.from_bytes(data[14:16], "big")
    if length > max_length:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes, more than the {max_length} allowed")
    if len(data) < length:
        return None
    block = data[16:length]
    if _V2_COMMANDS[command] == "LOCAL":
        # the receiver must skip the block whatever it holds, and use the real endpoints: there is no client
        return ProxyHeader(version=2, length=length, kind="LOCAL")
    family_name, needed = _V2_FAMILIES[family]
    if len(block) < needed:
        raise ProxyHeaderError(f"PROXY v2 {family_name} address block of {len(block)} bytes, "
                               f"shorter than {needed}")
    if family_name == "UNSPEC" or _V2_TRANSPORTS[transport] == "UNSPEC":
        return ProxyHeader(version=2, length=length, kind="UNSPEC")  # its block is to be ignored, TLVs and all
    _check_tlvs(block[needed:])
    if family_name == "UNIX":
        return ProxyHeader(version=2, length=length, kind="UNIX")
    protocol = "TCP" if _V2_TRANSPORTS[transport] == "STREAM" else "UDP"
    size = 4 if family_name == "INET" else 16
    make = IPv4Address if size == 4 else IPv6Address
    source = str(make(block[:size]))
    destination = str(make(block[size:2 * size]))
    sport = int.from_bytes(block[2 * size:2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2:2 * size + 4], "big")
    kind = f"{protocol}{4 if size == 4 else 6}"
    if protocol != "TCP":
        return ProxyHeader(version=2, length=length, kind=kind)
    return ProxyHeader(version=2, length=length, kind=kind, source=(source, sport), destination=(destination, dport))


def _check_tlvs(tlvs: bytes) -> None:
    """The TLVs after the addresses are skipped, but their framing must hold (as HAProxy's own parser
    insists): each is type, 2-byte length, value, and the last ends where the header does."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyHeaderError("PROXY v2 header ends inside a TLV")
        offset += 3 + int.from_bytes(tlvs[offset + 1:offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyHeaderError("PROXY v2 TLV longer than the header")


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None,
              tlvs: bytes = b"") -> bytes:
    """A v2 header for TCP from `source` to `destination` (IPv4 or IPv6, both the same family), or a LOCAL one
    when `source` is None: what HAProxy's `send-proxy-v2` sends. For tests and tools."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    destination = destination or (("0.0.0.0" if ":" not in source[0] else "::"), 0)
    is_v6 = ":" in source[0]
    make = IPv6Address if is_v6 else IPv4Address
    block = (make(source[0]).packed + make(destination[0]).packed + source[1].to_bytes(2, "big")
             + destination[1].to_bytes(2, "big") + tlvs)
    return V2_SIGNATURE + bytes([0x21, 0x21 if is_v6 else 0x11]) + len(block).to_bytes(2, "big") + block
