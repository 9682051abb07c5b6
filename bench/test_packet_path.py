"""bench/packet_path.py drives the fast path's own functions on stand-in connection objects: it must keep
working as the fast path changes (its own checks: every packet arrives, every packet is sealed)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().with_name("packet_path.py")


def test_packet_path_bench_runs_and_reports_both_paths():
    result = subprocess.run([sys.executable, str(SCRIPT), "--repeat", "1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["receive", "send"], result.stdout
    assert all("AES-GCM alone" in line and "the rest" in line for line in lines)
