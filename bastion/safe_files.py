"""Creating the files the CLI writes (audit exports, backups, ssh configs, the quickstart's files) so that a link
planted where one will be written is never followed and an existing file is never overwritten.

The admin often writes into a directory others can write to (/tmp, a shared backup mount). A plain
`open(path, "w")` there follows a symbolic link someone planted at that name and truncates whatever it points
to, as root. Everything here creates with O_CREAT|O_EXCL|O_NOFOLLOW, which fails instead, whatever the name
holds. A whole file is written under a random temporary name in the same directory and only then linked to its
name: `link()` fails when the name exists (even as a dangling link) instead of replacing it, so a reader never
sees half a file and nothing is clobbered. `replace=True` is for files that are the program's own to rewrite
(the quickstart's ssh_config): `rename()` over the name, which replaces a link rather than following it.

Only the last component of a path is guarded: the directory itself is the admin's choice.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import BastionError

STDOUT = "-"
"""Where a path is expected, `-` means standard output."""

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class FileExists(BastionError):
    """The destination exists (a file, a directory, a link): never overwritten."""


def is_stdout(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path) == STDOUT


def create_new(path: Path, mode: int = 0o600) -> int:
    """Create `path` and open it for writing; FileExists if anything is there, a link included."""
    try:
        return os.open(path, _CREATE, mode)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise BastionError(f"{path}: cannot create: {exc.strerror}") from None


@contextlib.contextmanager
def new_file(path: Path, mode: int = 0o600, *, binary: bool = False, replace: bool = False) -> Iterator[IO]:
    """Write a whole new file at `path`: the body writes to the yielded file object, which is a temporary file
    in the same directory, synced and linked to `path` when the body returns; if the body raises, nothing
    appears. FileExists if `path` exists (with `replace`, only if it is not a regular file)."""
    if not replace:
        _check_free(path)
    else:
        _check_replaceable(path)
    temporary, fd = _create_temporary(path.parent, path.name, mode)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        publish(temporary, path, replace=replace)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def write_new(path: Path, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
    """`new_file` for bytes already in hand."""
    with new_file(path, mode, binary=True, replace=replace) as handle:
        handle.write(data)


@contextlib.contextmanager
def staging_directory(path: Path) -> Iterator[Path]:
    """A private directory (0700, random name) next to `path`, removed afterwards, for a tool that opens files
    by name and makes companions of its own (SQLite writes FILE-journal): nobody else can plant anything in
    it. Publish the result with `publish(staged, path)`."""
    _check_free(path)
    try:
        directory = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise BastionError(f"{path.parent}: cannot create a temporary directory: {exc.strerror}") from None
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def publish(staged: Path, path: Path, *, replace: bool = False) -> None:
    """Give the finished file `staged` (in the same directory or a directory beside it) its name `path`,
    without overwriting (link) or, with `replace`, by renaming over a regular file; then sync the directory."""
    try:
        if replace:
            _check_replaceable(path)
            os.rename(staged, path)
        else:
            os.link(staged, path, follow_symlinks=False)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise BastionError(f"{path}: cannot create: {exc.strerror}") from None
    _sync_directory(path.parent)


def copy_to_stdout(path: Path) -> None:
    """Stream a finished file to standard output (the `-` destination)."""
    with open(path, "rb") as source:
        shutil.copyfileobj(source, sys.stdout.buffer, 1 << 20)
    sys.stdout.buffer.flush()


def _create_temporary(directory: Path, name: str, mode: int) -> tuple[Path, int]:
    """A new empty file with an unguessable name in `directory`, created with O_EXCL|O_NOFOLLOW, and its
    descriptor (written through, never reopened by name: the name is visible to others in the directory)."""
    for _ in range(16):  # a collision with a random 64-bit name means someone is planting names: try others
        temporary = directory / temporary_name(name)
        try:
            return temporary, os.open(temporary, _CREATE, mode)
        except FileExistsError:
            continue
        except OSError as exc:
            raise BastionError(f"{temporary}: cannot create: {exc.strerror}") from None
    raise BastionError(f"{directory}: cannot create a temporary file there")


def temporary_name(name: str) -> str:
    """.NAME.RANDOM.part: hidden, unguessable, recognizably ours."""
    return f".{name}.{secrets.token_hex(8)}.part"


def _check_free(path: Path) -> None:
    """Fail early, before any work, when `path` is taken (the final link() checks again)."""
    if os.path.lexists(path):
        raise _exists(path)


def _check_replaceable(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise FileExists(f"{path} is {kind}; not replaced (remove it if it is not yours)")


def _exists(path: Path) -> FileExists:
    if os.path.islink(path):
        return FileExists(f"{path} is a symbolic link; bastion never writes through one, choose a new name")
    return FileExists(f"{path} already exists; bastion never overwrites a file, choose a new name")


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
