"""The clients, all in gw: the OpenSSH client with its own config file, paramiko, a SOCKS5 handshake and an
HTTP GET over a tunnel's socket."""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testbed.bastion_process import Bastion
from testbed.keys import Key
from testbed.namespaces import LAN_ADDR, Testbed, netns_connect, wait_listening
from testbed.processes import SSH, kill_group, run, stop_process

_SSH_CONFIG = """\
Host bastion {gw_addr}
  HostName {gw_addr}
  Port {port}
  User {user}
  IdentityFile {identity}

Host target {lan_addr}
  HostName {lan_addr}
  User root
  IdentityFile {target_identity}

Host *
  IdentitiesOnly yes
  BatchMode yes
  ConnectTimeout 5
  UserKnownHostsFile {known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking {strict}
  ControlMaster no
  ControlPath none
  ForwardAgent no
  ForwardX11 no
  ServerAliveInterval 0
  LogLevel INFO
"""


class SshClient:
    """The real OpenSSH client, run in gw with its own config file (`ssh -F FILE`).

    `bastion` and `target` are host aliases in that file; ProxyJump's inner ssh reads the same file, which is
    why the IdentityFile of each host lives there and not on the command line.
    """

    __test__ = False

    def __init__(self, testbed: Testbed, bastion: Bastion, workdir: Path, identity: Key,
                 user: str = "alice") -> None:
        self.testbed = testbed
        self.bastion = bastion
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"ssh_config-{user}-{secrets.token_hex(2)}"
        known_hosts = workdir / "known_hosts"
        host_keys = bastion.host_public_keys()
        entries = [f"{bastion.host} {' '.join(key.split()[:2])}" for key in host_keys]
        if testbed.target_host_key is not None:
            entries.append(f"{LAN_ADDR} {' '.join(testbed.target_host_key.public.split()[:2])}")
        known_hosts.write_text("\n".join(entries) + "\n")
        target_identity = testbed.target_client_key.path if testbed.target_client_key else identity.path
        self.config.write_text(
            _SSH_CONFIG.format(
                gw_addr=bastion.host, port=bastion.port, user=user, identity=identity.path,
                lan_addr=LAN_ADDR, target_identity=target_identity, known_hosts=known_hosts,
                # without host keys in the home there is nothing to pin; accept-new keeps the test meaningful
                strict="yes" if host_keys else "accept-new",
            )
        )

    def argv(self, *args: str) -> list[str]:
        return self.testbed.argv(self.testbed.gw, [SSH, "-F", self.config, *args])

    def run(self, *args: str, input: bytes | None = None, timeout: float = 15.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return run(self.argv(*args), input=input, timeout=timeout, env=env)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return self.testbed.popen(self.testbed.gw, [SSH, "-F", self.config, *args], **kw)

    def stdio_forward(self, host: str, port: int, input: bytes | None = None,
                      timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
        """`ssh -W host:port bastion` (what ProxyJump does); IPv6 literals are bracketed."""
        spec = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.run("-W", spec, "bastion", input=input, timeout=timeout)

    @contextlib.contextmanager
    def forward(self, flag: str, spec: str, listen_port: int,
                timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
        """`ssh -N -o ExitOnForwardFailure=yes FLAG SPEC bastion` until the local listener exists; killed on exit."""
        proc = self.popen("-N", "-o", "ExitOnForwardFailure=yes", flag, spec, "bastion")
        try:
            wait_listening(proc, listen_port, f"ssh {flag} {spec}", timeout)
            yield proc
        finally:
            kill_group(proc, signal.SIGTERM)
            stop_process(proc)


def paramiko_connect(testbed: Testbed, bastion: Bastion, user: str, key: Key, timeout: float = 10.0):
    """A paramiko SSHClient connected to the bastion over a socket made in gw (host key pinned from the home)."""
    import paramiko

    sock = testbed.connect(testbed.gw, (bastion.host, bastion.port), timeout)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    for line in bastion.host_public_keys():
        kind, blob = line.split()[:2]
        client.get_host_keys().add(bastion.host, kind, paramiko.PKey.from_type_string(kind, _b64(blob)))
    try:
        client.connect(bastion.host, bastion.port, username=user, key_filename=str(key.path), sock=sock,
                       look_for_keys=False, allow_agent=False, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout, channel_timeout=timeout)
    except BaseException:
        client.close()
        sock.close()
        raise
    return client


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def recv_all(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    """Read until EOF (the socket's timeout applies to each recv)."""
    chunks = []
    total = 0
    while chunk := sock.recv(65536):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise AssertionError(f"more than {limit} bytes received")
    return b"".join(chunks)


def socks5_connect(ns: str, proxy_port: int, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A SOCKS5 CONNECT by host name through 127.0.0.1:`proxy_port` in `ns` (what curl --socks5-hostname does)."""
    sock = netns_connect(ns, ("127.0.0.1", proxy_port), timeout)
    try:
        sock.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
        if _recv_exactly(sock, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-authentication method")
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        version, reply, _, atyp = _recv_exactly(sock, 4)
        if reply != 0:
            raise ConnectionError(f"SOCKS5 CONNECT {host}:{port} failed with reply code {reply}")
        _recv_exactly(sock, {1: 4, 4: 16}.get(atyp) or _recv_exactly(sock, 1)[0])  # bound address
        _recv_exactly(sock, 2)  # bound port
        return sock
    except BaseException:
        sock.close()
        raise


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def http_get(sock: socket.socket, host: str, path: str) -> bytes:
    """GET `path` over an already connected socket with HTTP/1.0 and return the body (status must be 200)."""
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    response = recv_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise AssertionError(f"HTTP GET {path}: {status.decode(errors='replace')}")
    return body
