"""bench/fleet.py's own helpers (#22): its help runs without root or PostgreSQL, the nodes take turns, and the
ratios and table say what they should. The bench itself needs root and runs by hand."""

import subprocess
import sys
from pathlib import Path

import pytest

from fleet import Row, markdown, paired, percentile, turns


def test_help_runs_without_root_or_postgresql():
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("fleet.py")), "--help"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--markdown" in done.stdout and "revocation" in done.stdout


def test_the_nodes_take_turns_and_neither_always_goes_first():
    order = turns(3, ("postgresql", "sqlite"))
    assert order == ["postgresql", "sqlite", "sqlite", "postgresql", "postgresql", "sqlite"]


def test_percentiles_interpolate_between_ranks():
    samples = [float(v) for v in range(1, 101)]  # 1 … 100
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def test_a_pair_the_machine_slowed_for_both_cancels_in_the_paired_ratio():
    # pair 2 ran slow for both nodes, pair 3 for PostgreSQL alone: two of three pairs say 1.0, while the ratio of the
    # medians sets PostgreSQL's slow third turn against SQLite's fast one
    ratio, note = paired([10.0, 20.0, 12.0], [10.0, 20.0, 9.0])
    assert ratio == 1.0
    assert "paired: median of 3 ratios 1.00 (1.00–1.33); of the medians 1.20" in note


def test_the_markdown_table_marks_a_missed_target():
    rows = [Row("shipping", "audit shipping", "events/s", "higher", 4321.0, target="≥ 10,000/s", met=False),
            Row("login", "login latency p50", "ms", "lower", 22.0, 21.0, 22 / 21, "a | b", "ratio ≤ 1.10", True)]
    text = markdown(rows, {"mode": "quick", "seconds": 61, "loadavg": {"before": "1.0 1.0 1.0", "after": "2 2 2"}})
    assert "| shipping | audit shipping | events/s (higher is better) | 4,321 | – | – | ≥ 10,000/s: MISSED |" in text
    assert "| 22.0 | 21.0 | 1.05 | ratio ≤ 1.10: met | a \\| b |" in text
    assert "/proc/loadavg before: 1.0 1.0 1.0, after: 2 2 2" in text
