"""Policy files on disk: read one for `policy apply` and the tests (parsing is policy/file.py's, pure)."""

from __future__ import annotations

import os

from ..policy.file import PolicyFileError, parse_policy_bytes
from ..policy.model import Policy


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Read and parse the policy file at `path`."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as err:
        raise PolicyFileError(f"{os.fspath(path)}: cannot read the file: {err.strerror}") from None
    return parse_policy_bytes(raw, os.fspath(path))
