"""Run the gateway's coroutine on the configured event loop.

uvloop (libuv, written in C) costs less than half of what asyncio's loop costs per read/write wake-up, most of
a small message's round trip through a tunnel (README, Benchmarks). asyncio's own loop stays selectable
(`event_loop = "asyncio"`) for comparisons and for platforms without uvloop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], event_loop: str) -> T:
    """asyncio.run(coro) on a fresh loop of the kind `event_loop` names."""
    if event_loop == "asyncio":
        return asyncio.run(coro)
    try:
        import uvloop
    except ImportError:
        coro.close()
        raise ConfigError('event_loop = "uvloop" but uvloop is not installed; install it, or set '
                          'event_loop = "asyncio"') from None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
