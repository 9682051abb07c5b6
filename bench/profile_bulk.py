"""`bench/run.py --profile`: where the bastion's time goes while one -L tunnel moves bulk data.

py-spy (`pip install py-spy` into the venv) samples the running bastion by pid, from outside, without
restarting it, once per direction. The raw collapsed stacks are kept (speedscope.app and flamegraph.pl read
them); the top functions by own time and by inclusive time are printed.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bed import DEFAULT_CIPHER, Bench
from figures import DIRECTIONS, GIB
from targets import SINK_PORT, SOURCE_PORT

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def _short_frame(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3", "/src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def summarize(raw: Path, top: int = 15) -> str:
    """Top functions by own samples and by inclusive samples, from py-spy's collapsed (raw) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples (was the bastion busy?)"
    lines = [f"{total} samples"]
    # Frames on (nearly) every stack are the call chain down to the event loop: say so once, skip them.
    shared = {frame for frame, count in inclusive.items() if count >= 0.95 * total}
    inclusive = collections.Counter({f: c for f, c in inclusive.items() if f not in shared})
    for title, counter in (("own time", own), ("inclusive time (below the event loop)", inclusive)):
        lines.append(f"  top {top} by {title}:")
        for frame, count in counter.most_common(top):
            lines.append(f"    {100 * count / total:5.1f} %  {frame}")
    return "\n".join(lines)


def profile(args, params) -> int:
    spy = py_spy()
    size = max(params.bulk_bytes, GIB if not args.quick else 256 << 20)
    out_dir = (Path(args.json).parent if args.json else Path.cwd()).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    with Bench(args.bastion_src, event_loop=args.event_loop, congestion_control=args.congestion_control) as bench:
        server = bench.ours
        for direction, label in DIRECTIONS.items():
            target = SOURCE_PORT if direction == "down" else SINK_PORT
            raw = (out_dir / f"profile-{direction}.txt").resolve()
            with bench.forwards(server, [target], DEFAULT_CIPHER, one_connection=False) as ports:
                spy_proc = subprocess.Popen([spy, "record", "--pid", str(server.pid), "--rate", "250", "--nonblocking",
                                             "--format", "raw", "--output", str(raw)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.0)  # attached and sampling
                result = bench.client("pull" if direction == "down" else "push", "--ports", ports[0],
                                      "--bytes", size)
                spy_proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                _, err = spy_proc.communicate(timeout=60)
            speed = result["bytes"] / result["seconds"] / 1e6
            header = (f"bulk -L {label}, {DEFAULT_CIPHER}, {size >> 20} MiB at {speed:.0f} MB/s under py-spy, "
                      f"content {'ok' if result['ok'] else 'BAD'}; raw stacks: {raw}")
            body = summarize(raw) if raw.exists() else f"py-spy wrote nothing: {err.decode()[-800:]}"
            reports.append(f"{header}\n{body}")
            print(reports[-1], flush=True)
    return 0
