"""Parsing the TOML that people hand the bastion (config.toml, policy files) with its nesting bounded.

tomllib parses arrays and inline tables recursively, so `x = [[[[...` a few hundred levels deep ends in a
RecursionError and a traceback instead of a one-line error. No bastion file needs more than a handful of
levels: anything deeper than MAX_DEPTH is refused as invalid TOML, whichever way it was written (brackets,
inline tables, or a long dotted key, which tomllib builds without recursing but later code might walk).
"""

from __future__ import annotations

import tomllib
from typing import Any

MAX_DEPTH = 32
"""Tables and arrays inside each other; a policy file uses four ([users.alice], allow = [{...}])."""


def loads(text: str) -> dict[str, Any]:
    """`tomllib.loads(text)`; too deep a nesting raises `tomllib.TOMLDecodeError` like any other fault, so
    callers keep their one error path."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise tomllib.TOMLDecodeError(_too_deep()) from None
    if nesting_depth(data) > MAX_DEPTH:
        raise tomllib.TOMLDecodeError(_too_deep())
    return data


def nesting_depth(value: Any) -> int:
    """How many tables and arrays are inside each other in `value` (walked with a stack, not recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break  # deep enough to refuse; no need to walk the rest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _too_deep() -> str:
    return f"tables and arrays nested more than {MAX_DEPTH} levels deep"
