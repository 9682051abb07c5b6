"""The tests of the benchmark's own code (figures, bed, packet_path) run in the suite's default run: pyproject's
testpaths lists bench/ beside tests/. pytest puts this directory on sys.path (no __init__.py here), so they
import bench's modules by name, as run.py does; the testbed comes from the package at the repository's root.
Neither tree imports the other: tests/ never imports bench/, bench/ never imports tests/.

The ones marked `netns` make namespaces and need root; elsewhere they are skipped with the reason, as in tests/.
"""

from __future__ import annotations

import pytest

from testbed import skip_netns_tests_if_unavailable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_netns_tests_if_unavailable(items)
