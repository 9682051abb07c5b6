"""The local control socket: how the CLI reaches a running server (list and kill sessions, re-check
access after a policy or user change). A UNIX socket in the home directory, mode 0600: no network port.

Protocol: one JSON object per line each way. Requests: {"op": "sessions"}, {"op": "kill", "session": ID}
or {"op": "kill", "user": NAME}, {"op": "revalidate", "why": TEXT}. Replies: {"ok": true, ...} or
{"ok": false, "error": TEXT}.

One server per home: `serve_lock` holds HOME/serve.lock (an flock, which dies with the process) for as long as
the server runs, so a second `serve` refuses to start instead of taking over the control socket, and a socket
found at start is known to be a crashed server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from ..errors import BastionError

log = logging.getLogger("bastion.control")

SOCKET_NAME = "control.sock"
LOCK_NAME = "serve.lock"
_MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class NotRunning(BastionError):
    """No server answers on the control socket."""


class AlreadyRunning(BastionError):
    """Another server holds the home's serve lock."""


@contextlib.contextmanager
def serve_lock(home: Path) -> Iterator[None]:
    """Hold HOME/serve.lock while the body runs: the one server of this home. Raises AlreadyRunning, naming
    the holder's pid, if another process holds it.

    flock, not a pid file: the kernel releases it when the last descriptor closes, so a server killed with
    SIGKILL leaves nothing that blocks the next start, and no pid is ever guessed alive. Forked workers
    inherit the descriptor, so with `serve --workers N` the lock is held until the supervisor and every
    worker are gone. The pid inside is only for the message."""
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BastionError(f"{path}: cannot open the serve lock: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"{home}: bastion is already running (pid {_lock_holder(fd)}); stop it first, "
                                 "or serve another --home") from None
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)  # then cut: a reader never sees an empty file, at worst the new pid and a tail
        os.ftruncate(fd, len(pid))
        yield
        os.ftruncate(fd, 0)  # a clean stop leaves no pid behind
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    first = os.pread(fd, 64, 0).split(b"\n", 1)[0].strip()
    return first.decode() if first.isdigit() else "unknown"


def socket_path(home: Path, worker: int | None = None) -> Path:
    """control.sock, or control-N.sock for worker N of `serve --workers`."""
    return home / (SOCKET_NAME if worker is None else f"control-{worker}.sock")


def live_socket_paths(home: Path) -> list[Path]:
    return sorted(path for path in home.glob("control*.sock") if path.is_socket())


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A UNIX socket path must fit in 108 bytes; a deep home does not. Going through an open descriptor of
    its directory (/proc/self/fd/N/control.sock) reaches the same file with a short path."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def start_control_server(home: Path, handle: Handler, worker: int | None = None) -> asyncio.AbstractServer:
    """Listen on HOME/control.sock (replacing a stale socket left by a crash), readable by the owner only.
    Called under `serve_lock`: no live server owns a socket found here."""
    path = socket_path(home, worker)
    if path.is_socket():
        path.unlink()

    async def serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line.endswith(b"\n") or len(line) > _MAX_REQUEST:
                reply: dict[str, Any] = {"ok": False, "error": "request must be one JSON line"}
            else:
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError:
                    reply = {"ok": False, "error": "request is not a JSON object"}
                else:
                    reply = await handle(request)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()

    with _short_path(path) as bindable:
        server = await asyncio.start_unix_server(serve_client, path=bindable, limit=_MAX_REQUEST + 1)
    os.chmod(path, 0o600)
    return server


def request(home: Path, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the running server (every worker of it) and return the reply; NotRunning if
    none is listening. Replies of several workers are merged: lists are joined; it fails only if all fail."""
    paths = live_socket_paths(home)
    if not paths:
        raise NotRunning(f"bastion is not running (no control socket in {home})")
    replies, errors = [], []
    for path in paths:
        try:
            replies.append(_request_one(path, message, timeout))
        except NotRunning:
            continue  # a stale socket of a worker that is gone
        except BastionError as exc:
            errors.append(str(exc))
    if not replies:
        if errors:
            raise BastionError(errors[0])
        raise NotRunning(f"bastion is not running (nothing listens on {', '.join(map(str, paths))})")
    merged: dict[str, Any] = {"ok": True}
    for reply in replies:
        for key, value in reply.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged.setdefault(key, value)
    return merged


def _request_one(path: Path, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _short_path(path) as connectable:
                sock.connect(connectable)
        except (ConnectionRefusedError, FileNotFoundError):
            raise NotRunning(f"bastion is not running (nothing listens on {path})") from None
        except PermissionError:
            raise BastionError(f"{path}: permission denied; run as the user the server runs as") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise BastionError(f"{path}: the server sent an unreadable reply") from None
    if not reply.get("ok"):
        raise BastionError(reply.get("error", "the server refused the request"))
    return reply


def notify(home: Path, why: str) -> str | None:
    """Ask a running server to re-check live sessions now; returns a note for the user, None if none runs."""
    try:
        reply = request(home, {"op": "revalidate", "why": why})
    except NotRunning:
        return None
    except (BastionError, OSError) as exc:
        return f"warning: could not reach the running server ({exc}); it applies the change at the next channel open"
    ended = reply.get("ended", [])
    return f"live sessions re-checked; {len(ended)} ended or narrowed" if ended else "live sessions re-checked"
