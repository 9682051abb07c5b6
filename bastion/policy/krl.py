"""OpenSSH key revocation lists (KRL, `ssh-keygen -k`), read as sshd reads them (#21).

`parse_krl(data)` turns a KRL file's bytes into a frozen `RevocationList`, or raises `KrlError` (and nothing
else, whatever the bytes). `RevocationList.revokes(credential)` says why a key or certificate is revoked, or None.

The format is OpenSSH's PROTOCOL.krl, and the rules are krl.c's (ssh_krl_from_blob, ssh_krl_check_key):
- header: magic "SSHKRL\\n\\0", format version 1, KRL version, generated date, flags, reserved, comment;
- certificate sections, per CA (its public key blob; an empty blob: any CA): serial lists, serial ranges
  (lo <= hi, lo > 0), serial bitmaps (an mpint, bit N revokes offset + N) and key ids; serial 0 is never revoked
  by serial (it is what a CA that sets none writes), key ids are compared exactly;
- explicit keys (plain public key blobs), SHA1 and SHA256 hashes of plain key blobs;
- extension sections and certificate extension subsections: a critical one refuses the whole file, others are
  skipped;
- signature sections are skipped, as sshd does (it never checked them; OpenSSH 9.4 stopped making them).
A certificate is revoked when its certified key is (by blob or hash), when its CA key is, or when a section for
its CA or for any CA lists its serial or key id. Anything krl.c refuses (unknown sections, trailing bytes in a
section, a hash of the wrong length, a negative or overlong bitmap) is refused here too: a KRL we cannot read
must not be half-applied.

Pure: bytes in, values out; no I/O.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
from dataclasses import dataclass, field

MAGIC = b"SSHKRL\n\0"
FORMAT_VERSION = 1

SECTION_CERTIFICATES = 1
SECTION_EXPLICIT_KEY = 2
SECTION_FINGERPRINT_SHA1 = 3
SECTION_SIGNATURE = 4
SECTION_FINGERPRINT_SHA256 = 5
SECTION_EXTENSION = 255

CERT_SERIAL_LIST = 0x20
CERT_SERIAL_RANGE = 0x21
CERT_SERIAL_BITMAP = 0x22
CERT_KEY_ID = 0x23
CERT_EXTENSION = 0x39

_MAX_BIGNUM = 16384 // 8  # sshbuf's SSHBUF_MAX_BIGNUM
_U64 = 2**64 - 1
ANY_CA = ""  # the key of the "any CA" certificate section


class KrlError(ValueError):
    """The bytes are not a KRL that OpenSSH would load; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Credential:
    """What a login offered, as a revocation list is asked about it. `key` is the plain public key blob (for a
    certificate: the certified key). For a certificate, `ca_key` is the CA's public key blob, with its serial
    and key id; for a plain key they are None."""

    key: bytes
    ca_key: bytes | None = None
    serial: int | None = None
    key_id: str | None = None

    @property
    def is_certificate(self) -> bool:
        return self.ca_key is not None


@dataclass(frozen=True, slots=True)
class CertificateRevocations:
    """One certificate section's revocations, merged: serial ranges (sorted, disjoint) and key ids."""

    ranges: tuple[tuple[int, int], ...] = ()
    key_ids: frozenset[bytes] = frozenset()

    def serial_revoked(self, serial: int) -> bool:
        if serial == 0:  # krl.c: zero serials are ignored (the default when a CA sets none)
            return False
        index = bisect.bisect_right(self.ranges, (serial, _U64)) - 1
        return index >= 0 and self.ranges[index][0] <= serial <= self.ranges[index][1]


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A parsed KRL. `certificates` maps a CA (the SHA256 fingerprint of its key, "SHA256:…"; ANY_CA for the
    section that applies to every CA) to its revocations."""

    krl_version: int = 0
    generated_date: int = 0
    comment: str = ""
    certificates: dict[str, CertificateRevocations] = field(default_factory=dict)
    keys: frozenset[bytes] = frozenset()  # explicit plain key blobs
    sha1: frozenset[bytes] = frozenset()
    sha256: frozenset[bytes] = frozenset()

    def __hash__(self) -> int:  # the dict makes the generated hash fail; identity is enough for a value read once
        return id(self)

    def revokes(self, credential: Credential) -> str | None:
        """Why `credential` is revoked by this list (ssh_krl_check_key's order), or None."""
        reason = self._key_revoked(credential.key, "key")
        if reason is not None or credential.ca_key is None:
            return reason
        ca = fingerprint(credential.ca_key)
        for name in (ca, ANY_CA):
            section = self.certificates.get(name)
            if section is None:
                continue
            if credential.key_id is not None and credential.key_id.encode("utf-8", "surrogateescape") \
                    in section.key_ids:
                return "certificate key id revoked" + ("" if name == ca else " (for any CA)")
            if credential.serial is not None and section.serial_revoked(credential.serial):
                return f"certificate serial {credential.serial} revoked"
        return self._key_revoked(credential.ca_key, "CA key")

    def _key_revoked(self, blob: bytes, what: str) -> str | None:
        if hashlib.sha1(blob).digest() in self.sha1:
            return f"{what} revoked (by SHA1 hash)"
        if hashlib.sha256(blob).digest() in self.sha256:
            return f"{what} revoked (by SHA256 hash)"
        if blob in self.keys:
            return f"{what} revoked"
        return None

    def describe(self) -> str:
        """'KRL version 3, 2 CAs, 4 keys' for a log line."""
        hashes = len(self.sha1) + len(self.sha256)
        return (f"KRL version {self.krl_version}, {len(self.certificates)} certificate section(s), "
                f"{len(self.keys)} key(s), {hashes} hash(es)")


def fingerprint(blob: bytes) -> str:
    """'SHA256:…' of a public key blob, as `ssh-keygen -l` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class _Reader:
    def __init__(self, blob: bytes, what: str):
        self.blob, self.offset, self.what = blob, 0, what

    @property
    def left(self) -> int:
        return len(self.blob) - self.offset

    def take(self, size: int) -> bytes:
        if size > self.left:
            raise KrlError(f"{self.what} is truncated")
        chunk = self.blob[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def string(self) -> bytes:
        return self.take(self.uint(4))

    def cstring(self) -> bytes:
        value = self.string()
        if b"\0" in value:
            raise KrlError(f"{self.what} has a string with a NUL byte")
        return value


def parse_krl(data: bytes) -> RevocationList:
    """Read a KRL (see the module docstring). Raises KrlError, and only KrlError, for anything else."""
    try:
        return _parse(bytes(data))
    except KrlError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, UnicodeError) as exc:  # never expected; still one type
        raise KrlError(f"unreadable KRL: {type(exc).__name__}") from None


def _parse(data: bytes) -> RevocationList:
    if not data.startswith(MAGIC):
        raise KrlError("not a KRL (no SSHKRL magic); expected a file made by ssh-keygen -k")
    reader = _Reader(data, "KRL header")
    reader.take(len(MAGIC))
    version = reader.uint(4)
    if version != FORMAT_VERSION:
        raise KrlError(f"unsupported KRL format version {version}")
    krl_version, generated = reader.uint(8), reader.uint(8)
    reader.uint(8)  # flags: none defined
    reader.string()  # reserved
    comment = reader.cstring().decode("utf-8", "replace")
    reader.what = "KRL"
    serials: dict[str, list[tuple[int, int]]] = {}
    key_ids: dict[str, set[bytes]] = {}
    keys: set[bytes] = set()
    sha1: set[bytes] = set()
    sha256: set[bytes] = set()
    number = 0
    while reader.left:
        number += 1
        kind = reader.uint(1)
        section = _Reader(reader.string(), f"KRL section {number} (type {kind})")
        if kind == SECTION_CERTIFICATES:
            _certificates(section, serials, key_ids)
        elif kind == SECTION_EXPLICIT_KEY:
            _blobs(section, keys, 0)
        elif kind == SECTION_FINGERPRINT_SHA1:
            _blobs(section, sha1, 20)
        elif kind == SECTION_FINGERPRINT_SHA256:
            _blobs(section, sha256, 32)
        elif kind == SECTION_EXTENSION:
            _extension(section)
        elif kind == SECTION_SIGNATURE:
            reader.string()  # the signature after the signing key: skipped, as sshd does
            section.offset = section.left + section.offset
        else:
            raise KrlError(f"KRL section {number} has unsupported type {kind}")
        if section.left:
            raise KrlError(f"{section.what} has {section.left} unparsed bytes")
    cas = set(serials) | set(key_ids)
    return RevocationList(
        krl_version=krl_version, generated_date=generated, comment=comment,
        certificates={ca: CertificateRevocations(_merge(serials.get(ca, [])), frozenset(key_ids.get(ca, ())))
                      for ca in cas},
        keys=frozenset(keys), sha1=frozenset(sha1), sha256=frozenset(sha256),
    )


def _certificates(section: _Reader, serials: dict[str, list[tuple[int, int]]], key_ids: dict[str, set[bytes]]) -> None:
    ca_blob = section.string()
    section.string()  # reserved
    if ca_blob:
        _check_key_blob(ca_blob, section.what)
    ca = fingerprint(ca_blob) if ca_blob else ANY_CA
    ranges = serials.setdefault(ca, [])
    ids = key_ids.setdefault(ca, set())
    while section.left:
        kind = section.uint(1)
        sub = _Reader(section.string(), f"{section.what}, subsection type {kind:#x}")
        if kind == CERT_SERIAL_LIST:
            while sub.left:
                ranges.append(_range(sub.uint(8), None, sub.what))
        elif kind == CERT_SERIAL_RANGE:
            low = sub.uint(8)
            ranges.append(_range(low, sub.uint(8), sub.what))
        elif kind == CERT_SERIAL_BITMAP:
            offset = sub.uint(8)
            bits = _bitmap(sub.string(), sub.what)
            ranges.extend(_bitmap_ranges(offset, bits, sub.what))
        elif kind == CERT_KEY_ID:
            while sub.left:
                ids.add(sub.cstring())
        elif kind == CERT_EXTENSION:
            _extension(sub)
        else:
            raise KrlError(f"{section.what} has unsupported certificate subsection type {kind:#x}")
        if sub.left:
            raise KrlError(f"{sub.what} has {sub.left} unparsed bytes")


def _range(low: int, high: int | None, where: str) -> tuple[int, int]:
    high = low if high is None else high
    if low == 0 or low > high:
        raise KrlError(f"{where}: invalid serial range {low}-{high} (serials start at 1, low <= high)")
    return low, high


def _bitmap(mpint: bytes, where: str) -> int:
    if mpint and mpint[0] & 0x80:
        raise KrlError(f"{where}: negative serial bitmap")
    if len(mpint) > _MAX_BIGNUM + 1 or (len(mpint) == _MAX_BIGNUM + 1 and mpint[0] != 0):
        raise KrlError(f"{where}: serial bitmap longer than {_MAX_BIGNUM * 8} bits")
    return int.from_bytes(mpint, "big")


def _bitmap_ranges(offset: int, bits: int, where: str) -> list[tuple[int, int]]:
    """The runs of set bits as serial ranges; bit N is serial offset + N (it must not wrap past 2**64-1)."""
    if bits and offset + bits.bit_length() - 1 > _U64:
        raise KrlError(f"{where}: serial bitmap wraps past 2**64-1")
    found = []
    index = 0
    while bits:
        if bits & 1:
            run = (~bits & (bits + 1)).bit_length() - 1  # how many set bits from here
            found.append(_range(offset + index, offset + index + run - 1, where))
            bits >>= run
            index += run
        else:
            skip = (bits & -bits).bit_length() - 1  # how many clear bits to the next set one
            bits >>= skip
            index += skip
    return found


def _blobs(section: _Reader, into: set[bytes], length: int) -> None:
    while section.left:
        blob = section.string()
        if length and len(blob) != length:
            raise KrlError(f"{section.what}: a hash of {len(blob)} bytes, expected {length}")
        into.add(blob)


def _extension(section: _Reader) -> None:
    name = section.cstring().decode("utf-8", "replace")
    critical = section.uint(1)
    section.string()  # contents: no extension is supported
    if critical:
        shown = "".join(c if c.isprintable() else "?" for c in name)[:60]
        raise KrlError(f"{section.what}: unsupported critical extension {shown!r}")


def _check_key_blob(blob: bytes, where: str) -> None:
    """A CA key blob must at least start with its key type name (krl.c parses it whole)."""
    reader = _Reader(blob, f"{where}: CA key")
    name = reader.string()
    if not name or not name.isascii() or not all(32 < c < 127 for c in name):
        raise KrlError(f"{where}: the CA key is not an SSH public key blob")


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return tuple(merged)
