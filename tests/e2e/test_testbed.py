"""The testbed itself: sealed namespaces, working targets, and a teardown that leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import socket
from pathlib import Path

import pytest

from testbed import (
    CLOSE_FIRST_PAYLOAD,
    CLOSE_FIRST_PORT,
    ECHO_PORT,
    HTTP_FILE,
    HTTP_PAYLOAD,
    HTTP_PORT,
    LAN_ADDR,
    LAN_ADDR2,
    SSH,
    Testbed,
    http_get,
    recv_all,
    run,
)

pytestmark = pytest.mark.netns


def netns_list() -> str:
    return run(["ip", "netns", "list"], check=True).stdout.decode()


def test_namespaces_exist_without_a_default_route(testbed):
    names = netns_list()
    assert testbed.gw in names and testbed.lan in names
    for ns in (testbed.gw, testbed.lan):
        routes = testbed.run(ns, ["ip", "route", "show"], check=True).stdout.decode()
        assert "default" not in routes, routes


@pytest.mark.parametrize("address", ["8.8.8.8", "192.0.2.1", "169.254.169.254"])
def test_gw_cannot_reach_outside(testbed, address):
    with pytest.raises(OSError) as raised:
        testbed.connect(testbed.gw, (address, 53), timeout=2).close()
    assert raised.value.errno == errno.ENETUNREACH


def test_hosts_file_names_resolve_in_gw(testbed):
    script = (
        "import socket, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(name, sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET)}))\n"
    )
    result = testbed.run(testbed.gw, ["python3", "-c", script, "db.corp.internal", "mixed.evil.test",
                                      "meta.evil.test"], check=True)
    lines = result.stdout.decode().splitlines()
    assert lines == [
        "db.corp.internal ['10.99.0.2']",
        "mixed.evil.test ['10.99.0.2', '169.254.169.254']",
        "meta.evil.test ['169.254.169.254']",
    ]


def test_targets_answer_from_gw(testbed):
    with testbed.connect(testbed.gw, (LAN_ADDR, ECHO_PORT)) as sock:
        sock.sendall(b"echo?")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"echo?"
    with testbed.connect(testbed.gw, (LAN_ADDR2, CLOSE_FIRST_PORT)) as sock:
        assert recv_all(sock) == CLOSE_FIRST_PAYLOAD
    with testbed.connect(testbed.gw, (LAN_ADDR, HTTP_PORT)) as sock:
        body = http_get(sock, LAN_ADDR, f"/{HTTP_FILE}")
        assert hashlib.sha256(body).digest() == hashlib.sha256(HTTP_PAYLOAD).digest()


def test_target_sshd_accepts_the_client_key_directly(testbed, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{LAN_ADDR} {testbed.target_host_key.public}\n")
    result = testbed.run(testbed.gw, [
        SSH, "-F", "/dev/null", "-i", testbed.target_client_key.path, "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=5",
        f"root@{LAN_ADDR}", "echo", "hello",
    ], timeout=15)
    assert (result.returncode, result.stdout) == (0, b"hello\n"), result.stderr.decode()


def test_teardown_leaves_nothing_behind(tmp_path):
    bed = Testbed(tmp_path).create()
    sleeper = bed.popen(bed.gw, ["sleep", "300"])  # not tracked: teardown must find it via `ip netns pids`
    names = (bed.gw, bed.lan)
    bed.close()

    assert sleeper.wait(5) is not None, "a process in the namespace survived teardown"
    listed = netns_list()
    assert not any(name in listed for name in names), listed
    assert not any((Path("/etc/netns") / name).exists() for name in names)
    # the veth pair was only ever inside the namespaces; nothing of it shows in the host namespace
    assert f"btg{bed.suffix}" not in run(["ip", "link", "show"], check=True).stdout.decode()
