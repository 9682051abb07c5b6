"""A node whose PostgreSQL store cannot be reached when it starts does not start (#22; docs/fleet.md): it has no
copy of the policy to serve on. It says so in one line naming the setting, with no traceback, and exits non-zero."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys

import pytest

from tests.integration.test_serve_loopback import bastion, home  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("psycopg") is None,
                                reason="needs psycopg 3 (the fleet extra)")


def test_a_node_that_cannot_read_its_store_says_so_and_does_not_start(home):  # noqa: F811
    with socket.socket() as probe:  # a loopback port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = home / "config.toml"
    url = f"postgresql://bastion:s3cret@127.0.0.1:{port}/fleet"
    config.write_text(config.read_text().replace('store = ""', f'store = "{url}"'))
    assert f"127.0.0.1:{port}" in config.read_text()
    served = subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), "serve"], capture_output=True,
                            text=True, timeout=60)
    assert served.returncode != 0
    lines = [line for line in served.stderr.splitlines() if line.strip()]
    assert any("cannot read the store (config `store`): postgresql://bastion:***@127.0.0.1:" in line
               and "start it once PostgreSQL is reachable" in line for line in lines), served.stderr
    assert "Traceback" not in served.stderr and "s3cret" not in served.stderr
