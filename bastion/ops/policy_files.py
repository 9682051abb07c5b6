"""Policy files on disk: read one or several for `policy apply` and the tests (parsing is policy/file.py's, pure).

Several files, or a directory of `*.toml` files, make one declared policy: each user and group is defined in
exactly one file, and a name defined twice is an error naming both files (no silent overwrite)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..policy.file import PolicyFileError, parse_policy_bytes
from ..policy.model import Policy, RevokedList


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Read and parse the policy file at `path`."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as err:
        raise PolicyFileError(f"{os.fspath(path)}: cannot read the file: {err.strerror}") from None
    return parse_policy_bytes(raw, os.fspath(path))


def policy_paths(paths: Iterable[Path]) -> list[Path]:
    """The files to read: each path given, a directory standing for its `*.toml` files in name order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.glob("*.toml") if p.is_file())
            if not files:
                raise PolicyFileError(f"{path}: no *.toml policy files in this directory")
            found += files
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def load_policy_files(paths: Iterable[Path]) -> tuple[Policy, list[Path]]:
    """One policy from several files (see the module docstring) and the files it was read from."""
    files = policy_paths(paths)
    users: dict = {}
    groups: dict = {}
    cas: dict = {}
    revoked = RevokedList()
    defined_in: dict[tuple[str, str], Path] = {}
    for path in files:
        policy = load_policy_file(path)
        for section, entries, merged in (("users", policy.users, users), ("groups", policy.groups, groups),
                                         ("cas", policy.cas, cas)):
            for name, entry in entries.items():
                first = defined_in.setdefault((section, name), path)
                if first != path:
                    raise PolicyFileError(f"{path}: {section}.{name} is already defined in {first}; "
                                          "define each user, group and CA in one file")
                merged[name] = entry
        # [revoked] (#21) may appear in several files: a revocation in any of them counts
        revoked = RevokedList(*(tuple(dict.fromkeys(getattr(revoked, part) + getattr(policy.revoked, part)))
                                for part in ("serials", "key_ids", "fingerprints")))
    return Policy(users, groups, cas, revoked), files
