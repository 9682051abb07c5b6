"""Scenarios for the network guard's view of the host as it is now: an address added to the bastion's
host after start is its own, and cloud metadata addresses inside private ranges are refused.

Also the kernel question itself (`is_local_address`), asked inside a namespace of the test's own, with
and without `ip_nonlocal_bind`, where bind() would otherwise say yes to any address.

Nothing here sends a packet off the machine: the metadata addresses have no route from the gateway
namespace, so a refusal that leaked into a connect would show as "connect failed", not as
"administratively prohibited", and fail the test.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_address

import pytest

from testbed import GW_ADDR, PREFIX_LEN, SSH_PORT, in_netns, netns_socket, run

from bastion.gateway.local_addresses import is_local_address

pytestmark = pytest.mark.netns

PROHIBITED = "open failed: administratively prohibited: "
ADDED_ADDR = "10.99.0.9"  # inside the testbed's 10.99.0.0/24, which DEFAULT_POLICY grants on port 22


def client_reason(result) -> str:
    """The refusal reason the OpenSSH client printed, or the whole stderr when it printed none."""
    stderr = result.stderr.decode(errors="replace")
    return stderr.split(PROHIBITED, 1)[1].splitlines()[0].strip() if PROHIBITED in stderr else stderr.strip()


def gw_interface(testbed) -> str:
    """The gateway namespace's veth, found by the address it holds."""
    listing = run(["ip", "-n", testbed.gw, "-o", "-4", "addr", "show"], check=True).stdout.decode()
    for line in listing.splitlines():
        fields = line.split()
        if f"{GW_ADDR}/{PREFIX_LEN}" in fields:
            return fields[1]
    raise AssertionError(f"no interface holds {GW_ADDR} in {testbed.gw}:\n{listing}")


@contextlib.contextmanager
def added_address(testbed) -> Iterator[None]:
    """ADDED_ADDR on the gateway's interface for the duration (what DHCP or a failover would do)."""
    device = gw_interface(testbed)
    testbed.ip(testbed.gw, "addr", "add", f"{ADDED_ADDR}/{PREFIX_LEN}", "dev", device)
    try:
        yield
    finally:
        testbed.ip(testbed.gw, "addr", "del", f"{ADDED_ADDR}/{PREFIX_LEN}", "dev", device)


@contextlib.contextmanager
def service_on(testbed, address: str, port: int) -> Iterator[socket.socket]:
    """A listening socket in the gateway namespace: a service on the bastion's host itself."""
    server = netns_socket(testbed.gw)
    try:
        server.bind((address, port))
        server.listen(8)
        server.setblocking(False)
        yield server
    finally:
        server.close()


def accepted(server: socket.socket) -> bool:
    """Whether anybody connected to `server` (a completed handshake waits in the backlog)."""
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_an_address_added_after_start_is_the_bastions_own(testbed, bastion, ssh):
    # 1. the bastion is running: its guard was built before the address existed
    assert "listening on" in bastion.log()

    # 2. the host gains 10.99.0.9 (granted by the group's 10.99.0.0/24:22), with a service on it
    with added_address(testbed), service_on(testbed, ADDED_ADDR, SSH_PORT) as server:
        # 3. a tunnel to it is refused at once; a tunnel that opened would wait on the silent service
        try:
            result = ssh.stdio_forward(ADDED_ADDR, SSH_PORT, timeout=5)
        except subprocess.TimeoutExpired as exc:
            result = subprocess.CompletedProcess(exc.cmd, None, exc.stdout, exc.stderr or b"")
        # 4. the service on the bastion's host never saw a connection
        assert not accepted(server), "the bastion connected to a service on its own host"
        assert result.returncode not in (0, None)
        assert client_reason(result) == f"{ADDED_ADDR} is the bastion's own address", result.stderr

    # 5. audited as a refusal with the same reason
    rows = bastion.wait_audit("channels", lambda rows: len(rows) == 1, "the refused channel's row")
    assert (rows[0]["target_host"], rows[0]["decision"]) == (ADDED_ADDR, "deny"), rows[0]
    assert rows[0]["reason"] == f"{ADDED_ADDR} is the bastion's own address", rows[0]


METADATA_TARGETS = [
    ("fd00:ec2::254", 80, "is a cloud metadata address"),  # AWS, inside fc00::/7
    ("fd20:ce::254", 80, "is a cloud metadata address"),  # Google Cloud, inside fc00::/7
    ("100.100.100.200", 80, "is a cloud metadata address"),  # Alibaba, inside 100.64.0.0/10
    ("fd00:ec2::253", 53, "is a cloud platform service address"),  # AWS DNS
]


def test_metadata_inside_private_ranges_is_refused_though_granted(bastion, ssh):
    # 1. alice is granted every one of them explicitly: the refusal must come from the guard
    grants = ", ".join(f'"[{host}]:{port}"' if ":" in host else f'"{host}:{port}"'
                       for host, port, _ in METADATA_TARGETS)
    bastion.apply_policy(f"[users.alice]\nallow = [{grants}]\n")

    # 2. each refused as administratively prohibited, naming why (never "connect failed": no route)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: ssh.stdio_forward(case[0], case[1]), METADATA_TARGETS))
    for (host, port, why), result in zip(METADATA_TARGETS, results):
        assert result.returncode != 0
        assert client_reason(result) == f"{host} {why}", (host, result.stderr)

    # 3. audited as refusals
    rows = bastion.wait_audit("channels", lambda rows: len(rows) == len(METADATA_TARGETS), "a row per target")
    assert {row["decision"] for row in rows} == {"deny"}, rows


# ---- the kernel question, in a namespace of the test's own ------------------------------------

@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"bt-own-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", name], check=True)
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        run(["ip", "netns", "del", name], check=True)


def set_nonlocal_bind(namespace: str, value: int) -> None:
    for version in ("ipv4", "ipv6"):
        run(["ip", "netns", "exec", namespace, "sh", "-c", f"echo {value} > /proc/sys/net/{version}/ip_nonlocal_bind"],
            check=True)


def local_in(namespace: str, *addresses: str) -> list[bool]:
    return in_netns(namespace, lambda: [is_local_address(ip_address(a)) for a in addresses])


def binds_in(namespace: str, address: str) -> bool:
    def attempt() -> bool:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                return False
            return True
    return in_netns(namespace, attempt)


@pytest.mark.parametrize("nonlocal_bind", [0, 1])
def test_is_local_address_answers_for_the_host_as_it_is_now(namespace, nonlocal_bind):
    # 1. with ip_nonlocal_bind=1, bind() succeeds for any address: the check must not believe it
    set_nonlocal_bind(namespace, nonlocal_bind)
    assert binds_in(namespace, "10.77.0.2") == bool(nonlocal_bind)

    # 2. nothing but loopback yet
    assert local_in(namespace, "10.77.0.1", "fd00:77::1", "127.0.0.1", "::1") == [False, False, True, True]

    # 3. addresses appear: yes at once, neighbours still no
    run(["ip", "-n", namespace, "addr", "add", "10.77.0.1/32", "dev", "lo"], check=True)
    run(["ip", "-n", namespace, "addr", "add", "fd00:77::1/128", "dev", "lo", "nodad"], check=True)
    assert local_in(namespace, "10.77.0.1", "::ffff:10.77.0.1", "fd00:77::1", "10.77.0.2", "fd00:77::2") == [
        True, True, True, False, False]

    # 4. and disappear: no at once
    run(["ip", "-n", namespace, "addr", "del", "10.77.0.1/32", "dev", "lo"], check=True)
    run(["ip", "-n", namespace, "addr", "del", "fd00:77::1/128", "dev", "lo"], check=True)
    assert local_in(namespace, "10.77.0.1", "fd00:77::1") == [False, False]


def test_is_local_address_finds_link_local_addresses_on_their_interface(namespace):
    run(["ip", "-n", namespace, "link", "add", "own0", "type", "veth", "peer", "name", "own1"], check=True)
    run(["ip", "-n", namespace, "addr", "add", "fe80::77/64", "dev", "own1", "nodad"], check=True)
    for device in ("own0", "own1"):
        run(["ip", "-n", namespace, "link", "set", device, "up"], check=True)
    assert local_in(namespace, "fe80::77", "fe80::78", "ff02::1", "224.0.0.1") == [True, False, False, False]
