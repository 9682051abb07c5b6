"""bastion/transport/aead.py, the fast path's only AES-GCM and chacha20-poly1305@openssh.com seal and open:
published test vectors, byte-for-byte agreement with asyncssh's own encryption classes, and tampering.

AES-GCM: test cases 3, 4 and 16 of McGrew and Viega's GCM specification (the vectors of NIST SP 800-38D's
validation, used by RFC 5647's AEAD_AES_128_GCM and AEAD_AES_256_GCM), with the 12-byte IV read as SSH does:
a fixed field and an invocation counter. ChaCha20-Poly1305: OpenSSH's construction is not RFC 8439's AEAD
(§2.8.2's vector pads and MACs the lengths, and uses a 96-bit nonce), so what is tested against RFC 8439 is
what the construction is made of: the ChaCha20 keystream from block 1 (§2.4.2, whose 96-bit nonce with a zero
middle word is OpenSSH's 64-bit sequence number), the Poly1305 key from block 0 (§2.6.2) and Poly1305 (§2.5.2).
Needs no fast path: the module is pure.
"""

from __future__ import annotations

import random

import pytest
from asyncssh.encryption import get_encryption, get_encryption_params
from cryptography.hazmat.primitives.poly1305 import Poly1305

from bastion.transport import aead as aead_module
from bastion.transport.aead import AESGCM, TAG, ChachaPoly, gcm_nonce, gcm_open, gcm_seal, next_counter

h = bytes.fromhex

# GCM specification, test cases 3/4 (AES-128) and 16 (AES-256)
GCM_KEY_128 = h("feffe9928665731c6d6a8f9467308308")
GCM_KEY_256 = GCM_KEY_128 * 2
GCM_IV = h("cafebabefacedbaddecaf888")
GCM_PLAIN_64 = h("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
                 "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255")
GCM_AAD = h("feedfacedeadbeeffeedfacedeadbeefabaddad2")
GCM_VECTORS = [
    pytest.param(GCM_KEY_128, GCM_PLAIN_64, b"",
                 h("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
                   "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985"),
                 h("4d5c2af327cd64a62cf35abd2ba6fab4"), id="case 3, AES-128, no AAD"),
    pytest.param(GCM_KEY_128, GCM_PLAIN_64[:60], GCM_AAD,
                 h("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
                   "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"),
                 h("5bc94fbc3221a5db94fae95ae7121a47"), id="case 4, AES-128"),
    pytest.param(GCM_KEY_256, GCM_PLAIN_64[:60], GCM_AAD,
                 h("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
                   "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"),
                 h("76fc6ece0f4e1768cddf8853bb2d551b"), id="case 16, AES-256"),
]

# RFC 8439 §2.4.2: key 00..1f, nonce 00000000 0000004a 00000000, from block 1
CHACHA_KEY = bytes(range(32))
CHACHA_SEQ = 0x0000004A00000000  # the nonce's last 8 bytes as OpenSSH's 64-bit nonce (the sequence number)
SUNSCREEN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
             b"sunscreen would be it.")
SUNSCREEN_SEALED = h("6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
                     "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
                     "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
                     "5af90bbf74a35be6b40b8eedf2785e42874d")
# RFC 8439 §2.6.2: the Poly1305 key is the first 32 bytes of block 0 (key 80..9f, nonce 00000000 00010203 04050607)
POLY_KEY_GEN_KEY = bytes(range(0x80, 0xA0))
POLY_KEY_GEN_SEQ = 0x0001020304050607
POLY_KEY_GENERATED = h("8ad5a08b905f81cc815040274ab29471a833b637e3fd0da508dbb8e2fdd1a646")
# RFC 8439 §2.5.2
POLY_KEY = h("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
POLY_MESSAGE = b"Cryptographic Forum Research Group"
POLY_TAG = h("a8061dc1305136c6c22b8baf0c0127a9")


@pytest.mark.parametrize("key, plain, aad, sealed, tag", GCM_VECTORS)
def test_gcm_seal_and_open_give_the_published_vectors(key, plain, aad, sealed, tag):
    aead = AESGCM(key)
    nonce = gcm_nonce(GCM_IV[:4], int.from_bytes(GCM_IV[4:], "big"))  # fixed field, invocation counter
    assert nonce == GCM_IV
    assert gcm_seal(aead, nonce, aad, plain) == sealed + tag
    assert gcm_open(aead, nonce, aad, sealed + tag) == plain
    assert gcm_open(aead, nonce, memoryview(aad), memoryview(sealed + tag)) == plain  # views of a read buffer


def test_gcm_invocation_counter_moves_on_and_wraps_leaving_the_fixed_field():
    assert next_counter(5) == 6
    assert next_counter(2**64 - 1) == 0  # RFC 5647 §7.1: modulo 2^64
    assert gcm_nonce(b"\x01\x02\x03\x04", 2**64 - 1) == b"\x01\x02\x03\x04" + b"\xff" * 8


def test_chacha20_keystream_from_block_1_is_rfc_8439_2_4_2():
    """The packet is encrypted from block 1 of the main key's keystream, nonce = sequence number."""
    keys = ChachaPoly(CHACHA_KEY, bytes(32))
    length = len(SUNSCREEN).to_bytes(4, "big")
    sealed = keys.seal(CHACHA_SEQ, length, SUNSCREEN)
    assert bytes(sealed[4:-TAG]) == SUNSCREEN_SEALED


def test_poly1305_key_is_block_0_rfc_8439_2_6_2():
    """Block 0 of the main key's keystream is the Poly1305 key; the tag covers encrypted length and packet."""
    keys = ChachaPoly(POLY_KEY_GEN_KEY, bytes(32))
    body = b"a packet of some length"
    sealed = keys.seal(POLY_KEY_GEN_SEQ, len(body).to_bytes(4, "big"), body)
    assert bytes(sealed[-TAG:]) == Poly1305.generate_tag(POLY_KEY_GENERATED, bytes(sealed[:-TAG]))
    # the header key's block 0 (the same keystream) encrypts the length alone
    header_only = ChachaPoly(bytes(32), POLY_KEY_GEN_KEY)
    assert header_only.length(POLY_KEY_GEN_SEQ, bytes(4)) == POLY_KEY_GENERATED[:4]


def test_poly1305_is_rfc_8439_2_5_2():
    assert Poly1305.generate_tag(POLY_KEY, POLY_MESSAGE) == POLY_TAG


def _payload(seed: bytes, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("cipher_name", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                         "chacha20-poly1305@openssh.com"])
@pytest.mark.parametrize("size", [12, 4000, 32768 + 12])
def test_sealed_packets_are_what_asyncssh_would_send(cipher_name, size):
    """Same keys, sequence numbers and plaintext: aead.py gives asyncssh's bytes, and each opens the other's."""
    key_size, iv_size, _, _, _, _ = get_encryption_params(cipher_name.encode())
    key, iv = bytes(range(key_size)), bytes(range(100, 100 + iv_size))
    theirs, opener = (get_encryption(cipher_name.encode(), key, iv) for _ in range(2))
    body = _payload(cipher_name.encode(), size)
    header = len(body).to_bytes(4, "big")
    chacha = ChachaPoly(key[:32], key[32:]) if "chacha" in cipher_name else None
    aead = AESGCM(key) if chacha is None else None
    fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
    for seq in (0, 1, 0xFFFFFFFF):
        if chacha is None:
            sealed = header + gcm_seal(aead, gcm_nonce(fixed, counter), header, body)
        else:
            sealed = bytes(chacha.seal(seq, header, body))
        packet, mac = theirs.encrypt_packet(seq, header, body)
        assert sealed == packet + mac
        first, rest, tag = sealed[:16], sealed[16:-16], sealed[-16:]
        assert opener.decrypt_packet(seq, first, rest, 4, tag) == body
        if chacha is None:
            assert gcm_open(aead, gcm_nonce(fixed, counter), sealed[:4], sealed[4:]) == body
            counter = next_counter(counter)
        else:
            assert chacha.length(seq, sealed[:4]) == header
            assert chacha.open(seq, sealed[:-TAG], sealed[-TAG:]) == body
    if chacha is not None and aead_module._RESETTABLE:
        # one ChaCha20 context per key, moved from packet to packet (setting one up costs more than 16 KiB)
        assert all(chacha._streams)


def _sealers():
    """(name, seal(body) -> sealed bytes, open(sealed) -> body or None) for one packet of each cipher."""
    gcm_key, nonce = AESGCM(bytes(range(16))), gcm_nonce(b"\x00\x01\x02\x03", 7)
    chacha, seq = ChachaPoly(bytes(range(32)), bytes(range(32, 64))), 42
    return [
        ("aes-gcm",
         lambda body: (header := len(body).to_bytes(4, "big")) + gcm_seal(gcm_key, nonce, header, body),
         lambda sealed: gcm_open(gcm_key, nonce, sealed[:4], sealed[4:])),
        ("chacha20-poly1305",
         lambda body: bytes(chacha.seal(seq, len(body).to_bytes(4, "big"), body)),
         lambda sealed: chacha.open(seq, sealed[:-TAG], sealed[-TAG:])),
    ]


@pytest.mark.parametrize("name, seal, open_", [pytest.param(*sealer, id=sealer[0]) for sealer in _sealers()])
def test_flipping_any_single_bit_of_length_body_or_tag_fails_the_open(name, seal, open_):
    body = bytes((4,)) + b"\x5e" + b"channel data" + bytes(2)  # padding length, type, data, padding
    sealed = seal(body)
    assert open_(sealed) == body
    assert len(sealed) == 4 + len(body) + TAG
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        assert open_(bytes(tampered)) is None, f"{name}: bit {bit} flipped and still opened"
    assert open_(sealed) == body  # a failed open leaves nothing behind


def test_a_packet_opened_under_the_wrong_nonce_fails():
    gcm_key = AESGCM(bytes(16))
    sealed = gcm_seal(gcm_key, gcm_nonce(bytes(4), 1), bytes(4), b"body")
    assert gcm_open(gcm_key, gcm_nonce(bytes(4), 2), bytes(4), sealed) is None  # a replayed or reordered packet
    chacha = ChachaPoly(bytes(32), bytes(32))
    sealed = bytes(chacha.seal(1, bytes(4), b"body"))
    assert chacha.open(2, sealed[:-TAG], sealed[-TAG:]) is None
