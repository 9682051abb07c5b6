"""The bench's ratios (bench/figures.py): where rounds pair up, the row's ratio is the median of the per-round
ratios, so a round the whole machine ran slow in does not move it."""

import pytest

from figures import Row, paired


def test_a_round_that_slowed_both_servers_cancels_in_the_paired_ratio():
    # round 2 ran slow for both servers, round 3 only for ours: each round's own ratio is 1.0, 1.0 and 0.78, while
    # the ratio of the medians sets ours' slow round 2 against sshd's fast round 1
    ours = [{"mb_s": 1000}, {"mb_s": 800}, {"mb_s": 790}]
    sshd = [{"mb_s": 1000}, {"mb_s": 800}, {"mb_s": 1010}]
    ratio, note = paired(ours, sshd, lambda s: s["mb_s"])
    assert ratio == 1.0
    assert "median of 3 per-round ratios (0.78–1.00); of the medians 0.80" in note


def test_a_row_reports_its_paired_ratio_and_falls_back_to_ours_over_the_reference():
    assert Row(1, "m", "MB/s", "higher", 800.0, 1000.0, paired=1.02).ratio == 1.02
    assert Row(1, "m", "MB/s", "higher", 800.0, 1000.0).ratio == pytest.approx(0.8)
    assert Row(1, "m", "MB/s", "higher", 800.0, None).ratio is None
