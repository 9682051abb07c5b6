"""Shared fixtures: the sealed network testbed (session), keys (session), and a fresh bastion per test.

The tiers and the rule for which one a test goes in are in tests/README.md (unit/ pure and fast, integration/
the CLI and loopback servers, e2e/ the namespaces, load/ opt-in). The testbed itself is the `testbed` package
at the repository's root, shared with bench/ (pyproject's `pythonpath = ["."]` puts the root on sys.path).

Tests marked `netns` need root (they create network namespaces); without it they are skipped with the
reason `netns_unavailable()` gives, and the loopback tests still run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests judge correctness, not speed: on a loaded 2-core CI box a slow example is not a failure.
settings.register_profile("bastion", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bastion")

from testbed import (DEFAULT_POLICY, Bastion, Key, SshClient, Testbed, generate_key, netns_unavailable,
                     skip_netns_tests_if_unavailable, start_targets)

BASTIONS = pytest.StashKey[list[Bastion]]()


def pytest_configure(config: pytest.Config) -> None:
    """Let the suite's child interpreters keep their bytecode, in a directory of this run's own.

    The suite starts some hundreds of `python -m bastion` (serve, the CLI): with PYTHONDONTWRITEBYTECODE set, as
    it is on this machine, each one compiled the bastion modules it imports from source again (measured here:
    1.47 s of CPU instead of 1.39 s for `bastion access alice`). PYTHONPYCACHEPREFIX keeps the .pyc files out of
    the work tree; the directory goes at the end of the run.
    """
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        prefix = tempfile.mkdtemp(prefix="bastion-tests-pyc-")
        config.add_cleanup(lambda: shutil.rmtree(prefix, ignore_errors=True))
        os.environ.pop("PYTHONDONTWRITEBYTECODE")
        os.environ["PYTHONPYCACHEPREFIX"] = prefix

    # .ci/run runs the suite on two pytest-xdist workers, which start with COLUMNS=80 and LINES=24 set: the CLI's
    # tables read $COLUMNS when stdout is not a terminal, so a worker would print them cut to 80 columns. Give
    # each worker the terminal variables the run itself has (pytest_configure_node below).
    for key, value in getattr(config, "workerinput", {}).get("bastion_terminal_env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook, in the controller: what each worker is handed
def pytest_configure_node(node) -> None:  # type: ignore[no-untyped-def]
    node.workerinput["bastion_terminal_env"] = {key: os.environ.get(key) for key in ("COLUMNS", "LINES")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_netns_tests_if_unavailable(items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On failure, attach each bastion's serve log to the report (sections are read when the report is built)."""
    if call.excinfo is not None and call.when in ("setup", "call"):
        for bastion in item.stash.get(BASTIONS, []):
            log = bastion.log()
            item.add_report_section(call.when, f"bastion serve log ({bastion.home})", log[-30000:] or "(empty)")
    yield


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """Namespaces bt-gw-XXXX / bt-lan-XXXX with sshd, echo, HTTP and close-first targets running in lan."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with Testbed(tmp_path_factory.mktemp("testbed")).create() as bed:
        start_targets(bed)
        yield bed


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    """alice (a registered user's key) and stranger (a key the bastion has never seen)."""
    directory = tmp_path_factory.mktemp("keys")
    return {name: generate_key(directory / name, f"{name}@test") for name in ("alice", "stranger")}


@pytest.fixture
def make_bastion(testbed: Testbed, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[type[Bastion]]:
    """Factory for a bastion home in this test's tmp_path; every server it started is killed at teardown."""
    made: list[Bastion] = []
    request.node.stash[BASTIONS] = made

    def factory(name: str = "bastion", **kw: object) -> Bastion:
        bastion = Bastion(testbed, tmp_path / name, **kw)  # type: ignore[arg-type]
        made.append(bastion)
        return bastion

    yield factory  # type: ignore[misc]
    for bastion in made:
        bastion.close()


TEST_CONFIG = {"connect_timeout": 2, "shutdown_grace_seconds": 2}


@pytest.fixture(scope="session")
def bastion_home_template(testbed: Testbed, keys: dict[str, Key], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home made once with the real CLI (init, user add alice, policy apply DEFAULT_POLICY).

    Each test's bastion starts on a copy: a fresh server and fresh state, without paying for host key
    generation and three interpreter starts per test. test_e2e_setup.py walks the same steps from scratch.
    """
    template = Bastion(testbed, tmp_path_factory.mktemp("template") / "home")
    template.init(**TEST_CONFIG)
    template.add_user("alice", keys["alice"])
    template.apply_policy(DEFAULT_POLICY)
    return template.home


@pytest.fixture
def bastion(make_bastion, bastion_home_template: Path) -> Bastion:  # type: ignore[no-untyped-def]
    """A fresh, running bastion on 10.99.0.1:22: user alice (her key), DEFAULT_POLICY, connect_timeout 2 s,
    shutdown grace 2 s."""
    bastion = make_bastion()
    shutil.copytree(bastion_home_template, bastion.home)  # copy2 keeps the 0600/0700 modes
    bastion.start()
    return bastion


@pytest.fixture
def ssh(testbed: Testbed, bastion: Bastion, keys: dict[str, Key], tmp_path: Path) -> SshClient:
    """The OpenSSH client as alice, in gw, pinned to the bastion's host keys."""
    return SshClient(testbed, bastion, tmp_path / "client", keys["alice"])
