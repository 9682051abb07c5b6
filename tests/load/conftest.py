"""The load test is not part of the default run: tests marked `slow` are skipped unless `BASTION_LOAD=1` is
set (or `--run-slow` is given together with the path tests/load, which makes this conftest an initial one).

    BASTION_LOAD=1 .venv/bin/python -m pytest tests/load -q -s
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run the load test (marked slow)")


def _wanted(config: pytest.Config) -> bool:
    # getoption with a default: when pytest starts from the repository root, this conftest is not an
    # initial one and the option was never registered
    return os.environ.get("BASTION_LOAD") == "1" or bool(config.getoption("--run-slow", default=False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _wanted(config):
        return
    skip = pytest.mark.skip(reason="load test: run with BASTION_LOAD=1 .venv/bin/python -m pytest tests/load -q -s")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)
