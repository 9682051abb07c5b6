"""The testbed the suite and the benchmark share: real namespaces, real targets, the real bastion, real clients.

Split by job, each module importing only the ones above it in this list:

    processes        running a program: mandatory timeout, clean environment, process groups, TestbedError
    keys             key pairs from the real ssh-keygen
    namespaces       the sealed network (Testbed: two namespaces, a veth pair, no default route), sockets made
                     in a namespace, `ip netns exec`, and why the namespace tests cannot run here (not root)
    targets          what the bastion tunnels to in lan: sshd, echo, close-first, HTTP (start_targets)
    bastion_process  one bastion home and its `bastion serve` in gw (Bastion), DEFAULT_POLICY
    clients          the OpenSSH client (SshClient), paramiko, SOCKS5, HTTP over a tunnel

Why here, at the top of the repository, and not in tests/: bench/ uses it too, and neither tree may import
the other (bench/ used to put tests/ on sys.path). A package of its own keeps both directions closed: tests/
and bench/ each import `testbed`, never each other. It is not shipped: pyproject's package list is
`bastion*` only, and pytest finds it through `pythonpath = ["."]`; bench's scripts put the repository root on
sys.path in bench/bed.py. See /work/shared/TESTBED.md for the layout and the rules it keeps.

The names below are the package's door, so a test imports `from testbed import Bastion, ECHO_PORT`; import a
module's own names from the module when the job matters more than brevity.
"""

from testbed.bastion_process import DEFAULT_POLICY, Bastion
from testbed.clients import SshClient, http_get, paramiko_connect, recv_all, socks5_connect
from testbed.keys import Key, generate_key, load_key
from testbed.namespaces import (
    GW_ADDR,
    LAN_ADDR,
    LAN_ADDR2,
    PREFIX_LEN,
    TEST_HOSTS,
    Testbed,
    free_port,
    in_netns,
    listening_ports,
    netns_connect,
    netns_socket,
    netns_unavailable,
    skip_netns_tests_if_unavailable,
    wait_listening,
)
from testbed.processes import (
    DEFAULT_TIMEOUT,
    SSH,
    SSH_KEYGEN,
    SSHD,
    TestbedError,
    clean_env,
    kill_group,
    run,
    stop_process,
    wait_until,
)
from testbed.targets import (
    CLOSE_FIRST_PAYLOAD,
    CLOSE_FIRST_PAYLOAD_SIZE,
    CLOSE_FIRST_PORT,
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_FILE,
    HTTP_FILE_SIZE,
    HTTP_PAYLOAD,
    HTTP_PORT,
    SSH_PORT,
    deterministic_bytes,
    start_targets,
)

__all__ = [
    "CLOSED_PORT", "CLOSE_FIRST_PAYLOAD", "CLOSE_FIRST_PAYLOAD_SIZE", "CLOSE_FIRST_PORT", "DEFAULT_POLICY",
    "DEFAULT_TIMEOUT", "ECHO_PORT", "GW_ADDR", "HTTP_FILE", "HTTP_FILE_SIZE", "HTTP_PAYLOAD", "HTTP_PORT",
    "LAN_ADDR", "LAN_ADDR2", "PREFIX_LEN", "SSH", "SSHD", "SSH_KEYGEN", "SSH_PORT", "TEST_HOSTS", "Bastion", "Key",
    "SshClient", "Testbed", "TestbedError", "clean_env", "deterministic_bytes", "free_port", "generate_key",
    "http_get", "in_netns", "kill_group", "listening_ports", "load_key", "netns_connect", "netns_socket",
    "netns_unavailable", "skip_netns_tests_if_unavailable", "paramiko_connect", "recv_all", "run", "socks5_connect", "start_targets", "stop_process",
    "wait_listening", "wait_until",
]
