"""What the server negotiates and which user keys are strong enough: nothing weaker than OpenSSH 9.x.

asyncssh's server defaults are far wider than sshd's: SHA-1 (`ssh-rsa` host-key signatures,
diffie-hellman-group14-sha1, hmac-sha1*), DH group exchange that hands out a 1024-bit group, the @ssh.com
MACs, groups 15 and 17, secp256k1. The lists below start from what OpenSSH 9.x's sshd offers by default
(`sshd -T` of OpenSSH 9.2p1 on the CI machine, plus mlkem768x25519-sha256, in sshd's default list since
9.9), keep what asyncssh implements, and leave out what `ssh-audit` fails, so they are sshd's or stricter:

- key exchange: no NIST-curve ECDH (ssh-audit: "fail"); no diffie-hellman-group-exchange-sha256
  (asyncssh's server gives a 1024-bit group to a client that asks for one, where sshd's moduli file starts
  at 2048); no diffie-hellman-group14-sha256 (2048-bit). Every client since 2014 has curve25519, and the
  fixed 4096/8192-bit groups stay for FIPS-mode clients that refuse it.
- MACs (only used with the CTR ciphers; GCM and chacha20 carry their own): no SHA-1, no 64-bit UMAC tags,
  no umac-128 without encrypt-then-MAC. hmac-sha2-256/512 without ETM stay for clients that lack ETM
  (paramiko before 3.3, older Go x/crypto); ssh-audit warns about them, and sshd offers them too.
- ciphers: sshd's six, unchanged. AES-GCM and chacha20-poly1305 are the ones the fast path speeds up.
- compression: none, unless the operator turns on zlib@openssh.com (config `compression`), which starts
  only after authentication; plain `zlib` (before authentication) never.
- signatures: what sshd's PubkeyAcceptedAlgorithms allows without certificates (no `ssh-rsa`, i.e. no
  SHA-1, no DSA); the host keys sign with ssh-ed25519 and rsa-sha2-512/256 only (`host_key_pairs`).

Which keys are strong enough is policy/keys.py's rule, shared with `user add`, policy files and logins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..policy.keys import describe_key, weak_key_reason

if TYPE_CHECKING:
    import asyncssh

KEX_ALGORITHMS = (
    "mlkem768x25519-sha256",  # post-quantum hybrid, OpenSSH 9.9+
    "sntrup761x25519-sha512",  # post-quantum hybrid; offered only where asyncssh has it (liboqs)
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
)
ENCRYPTION_ALGORITHMS = (
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
MAC_ALGORITHMS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)
COMPRESSION_OFF = ("none",)
COMPRESSION_ON = ("none", "zlib@openssh.com")  # as sshd's `Compression yes`; the client's order decides
# Signatures a user may log in with (sent as server-sig-algs, and enforced: see `apply`).
SIGNATURE_ALGORITHMS = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",  # how a browser-made sk-ecdsa key signs; sshd accepts it
    "rsa-sha2-512",
    "rsa-sha2-256",
)
# What the host keys sign the key exchange with: ssh-rsa (SHA-1) is not among them.
HOST_KEY_ALGORITHMS = ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256")



def server_options(compression: bool) -> dict[str, Any]:
    """The algorithm arguments of asyncssh.create_server: the lists above, less what this asyncssh lacks."""
    from asyncssh.compression import get_compression_algs
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_public_key_algs

    def available(wanted: Sequence[str], supported: Iterable[bytes]) -> list[str]:
        names = {name.decode() for name in supported}
        return [name for name in wanted if name in names]

    return {
        "kex_algs": available(KEX_ALGORITHMS, get_kex_algs()),
        "encryption_algs": available(ENCRYPTION_ALGORITHMS, get_encryption_algs()),
        "mac_algs": available(MAC_ALGORITHMS, get_mac_algs()),
        "compression_algs": available(COMPRESSION_ON if compression else COMPRESSION_OFF, get_compression_algs()),
        "signature_algs": available(SIGNATURE_ALGORITHMS, get_public_key_algs()),
    }


def host_key_pairs(keys: Sequence[asyncssh.SSHKey]) -> list[asyncssh.SSHKeyPair]:
    """The host keys as key pairs that sign only with HOST_KEY_ALGORITHMS; ConfigError for a host key that
    is too weak (the user-key rule) or cannot sign with any of them.

    A server's host-key algorithms are not an option of asyncssh's server (`server_host_key_algs` is the
    client's): it offers every algorithm each loaded key pair lists in `host_key_algorithms`, for an RSA
    key also ssh-rsa and four @ssh.com variants. Narrowing that list on the pair is what narrows the offer;
    `sig_algorithms` goes with it so that nothing signs with SHA-1 by default either."""
    import asyncssh

    from ..errors import ConfigError

    pairs = []
    for key, pair in zip(keys, asyncssh.load_keypairs(list(keys))):
        where = f"{key.get_filename().decode() if key.get_filename() else 'host key'}"
        weakness = weak_key_reason(pair.key_public_data)
        if weakness:
            raise ConfigError(f"{where}: host key {describe_key(pair.key_public_data)}: {weakness}")
        allowed = tuple(alg for alg in pair.host_key_algorithms if alg.decode() in HOST_KEY_ALGORITHMS)
        if not allowed:
            raise ConfigError(f"{where}: host key {describe_key(pair.key_public_data)} cannot sign with any of "
                              f"{', '.join(HOST_KEY_ALGORITHMS)}")
        pair.host_key_algorithms = allowed
        pair.sig_algorithms = allowed
        pairs.append(pair)
    return pairs


def apply() -> None:
    """Make a server hold user-auth signatures to its `signature_algs`, as sshd holds them to
    PubkeyAcceptedAlgorithms.

    asyncssh 2.24.1 sends `signature_algs` to the client (server-sig-algs) but verifies any signature the
    key type can make: an RSA key signing with ssh-rsa (SHA-1) was accepted. Wraps the server connection's
    validate_public_key once, so a signature of another algorithm fails like a bad signature."""
    from asyncssh.connection import SSHServerConnection
    from asyncssh.packet import PacketDecodeError, SSHPacket

    original = SSHServerConnection.validate_public_key
    if getattr(original, "_bastion_signature_algs", False):
        return

    async def validate_public_key(self, username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        if msg:  # with a signature; without one, the client only asks whether the key would do
            try:
                algorithm = SSHPacket(signature).get_string()
            except PacketDecodeError:
                return False
            if algorithm not in self._sig_algs:
                # %r: the name is the client's, escaped before it reaches a log line
                self.logger.info("refused a user-auth signature made with %r: not an accepted algorithm",
                                 algorithm[:64])
                return False
        return await original(self, username, key_data, msg, signature)

    validate_public_key._bastion_signature_algs = True  # type: ignore[attr-defined]
    validate_public_key.__doc__ = original.__doc__
    SSHServerConnection.validate_public_key = validate_public_key  # type: ignore[method-assign]
