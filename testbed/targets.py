"""What the bastion tunnels to, in lan: a real OpenSSH sshd, an echo server (the client closes first), a
close-first server (the target closes first) and an HTTP server, each on a fixed address and port.

    10.99.0.2   sshd :22, HTTP :8080 (10.99.0.2 only)
    10.99.0.3   echo :7 and close-first :7001 (all addresses); nothing on :9
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from testbed.keys import generate_key
from testbed.namespaces import LAN_ADDR, Testbed
from testbed.processes import SSHD

SSH_PORT = 22
ECHO_PORT = 7
HTTP_PORT = 8080
CLOSE_FIRST_PORT = 7001
CLOSED_PORT = 9  # nothing listens here: connect() gets a RST

HTTP_FILE = "blob.bin"
HTTP_FILE_SIZE = 300_000
CLOSE_FIRST_PAYLOAD_SIZE = 512 * 1024


def deterministic_bytes(size: int, seed: bytes) -> bytes:
    """Incompressible but reproducible bytes, so a truncated or reordered transfer is caught."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


CLOSE_FIRST_PAYLOAD = deterministic_bytes(CLOSE_FIRST_PAYLOAD_SIZE, b"close-first")
HTTP_PAYLOAD = deterministic_bytes(HTTP_FILE_SIZE, b"http-blob")


_TCP_TARGETS = r'''
"""Tiny TCP targets for the testbed: `echo PORT`, `close-first PORT PAYLOAD_FILE` and `source PORT` (an endless
stream: a bulk download)."""
import socket, sys, threading

def serve(port, handle):
    srv = socket.create_server(("0.0.0.0", port), reuse_port=False)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()

def echo(conn):
    # echo until the peer half-closes, then close: the client-closes-first order
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

def close_first(payload):
    def handle(conn):
        # write the payload and close at once, without reading: the target-closes-first order
        with conn:
            conn.sendall(payload)
    return handle

def source(conn):
    chunk = bytes(range(256)) * 256
    with conn:
        try:
            while True:
                conn.sendall(chunk)
        except OSError:
            pass

mode, port = sys.argv[1], int(sys.argv[2])
if mode == "echo":
    serve(port, echo)
elif mode == "close-first":
    serve(port, close_first(open(sys.argv[3], "rb").read()))
elif mode == "source":
    serve(port, source)
else:
    sys.exit(f"unknown mode {mode}")
'''

_SSHD_CONFIG = """\
Port {port}
ListenAddress {addr}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
"""


def start_targets(bed: Testbed) -> None:
    """Start sshd, echo, HTTP and close-first servers in `bed`'s lan and wait until each listens; the sshd's
    host key and a key it accepts are left on `bed` for the clients. `bed.close()` stops them."""
    bed.target_host_key = generate_key(bed.workdir / "target_host_ed25519_key", "target-host")
    bed.target_client_key = generate_key(bed.workdir / "target_client_key", "target-client")
    authorized_keys = bed.workdir / "target_authorized_keys"
    authorized_keys.write_text(bed.target_client_key.public + "\n")
    sshd_config = bed.workdir / "target_sshd_config"
    sshd_config.write_text(
        _SSHD_CONFIG.format(
            port=SSH_PORT,
            addr=LAN_ADDR,
            host_key=bed.target_host_key.path,
            pid_file=bed.workdir / "target_sshd.pid",
            authorized_keys=authorized_keys,
        )
    )
    # sshd's privilege-separation directory; left in place on teardown, as other sshds (another
    # testbed in a parallel run, the benchmark) may need it while we tear down
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    bed.start("target-sshd", bed.lan, [SSHD, "-D", "-e", "-f", sshd_config], SSH_PORT)

    script = bed.workdir / "tcp_targets.py"
    script.write_text(_TCP_TARGETS)
    bed.start("echo", bed.lan, [sys.executable, script, "echo", str(ECHO_PORT)], ECHO_PORT)
    payload_file = bed.workdir / "close_first.bin"
    payload_file.write_bytes(CLOSE_FIRST_PAYLOAD)
    bed.start("close-first", bed.lan, [sys.executable, script, "close-first", str(CLOSE_FIRST_PORT),
                                       payload_file], CLOSE_FIRST_PORT)

    bed.http_root.mkdir(exist_ok=True)
    (bed.http_root / HTTP_FILE).write_bytes(HTTP_PAYLOAD)
    bed.start("http", bed.lan, [sys.executable, "-m", "http.server", "--bind", LAN_ADDR,
                                "--directory", bed.http_root, str(HTTP_PORT)], HTTP_PORT)
