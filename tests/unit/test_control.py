"""The control socket: owner-only, reachable from a deep home, and clear when no server runs."""

import asyncio
import threading

import pytest

from bastion.service.control import NotRunning, request, socket_path, start_control_server


def serve_in_thread(home, handle):
    """Run a control server on its own loop; returns a stop function."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def main():
        server = await start_control_server(home, handle)
        ready.set()
        async with server:
            await asyncio.Event().wait()

    task = None

    def run():
        nonlocal task
        asyncio.set_event_loop(loop)
        task = loop.create_task(main())
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)

    def stop():
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)

    return stop


@pytest.mark.parametrize("depth", [1, 12])
def test_request_reply_and_owner_only_socket(tmp_path, depth):
    home = tmp_path.joinpath(*["a-fairly-long-directory-name"] * depth)
    home.mkdir(parents=True)

    async def handle(message):
        return {"ok": True, "echo": message}

    stop = serve_in_thread(home, handle)
    try:
        assert request(home, {"op": "ping"})["echo"] == {"op": "ping"}
        assert socket_path(home).stat().st_mode & 0o777 == 0o600
    finally:
        stop()


def test_no_server_says_not_running(tmp_path):
    with pytest.raises(NotRunning, match="not running"):
        request(tmp_path, {"op": "sessions"})
