"""RowThrottle (bastion/policy/throttle.py, #22): the first refusal of a kind gets its audit row at once, the
same again within the interval is only counted, and the next row says how many were left out."""

from bastion.policy.throttle import RowThrottle


def test_one_row_per_key_and_interval_with_the_count_left_out():
    throttle = RowThrottle(interval=60)
    assert throttle.admit(("10.0.0.5", "missing"), 0.0) == 0
    assert [throttle.admit(("10.0.0.5", "missing"), t) for t in (1.0, 30.0, 59.9)] == [None, None, None]
    assert throttle.admit(("10.0.0.5", "timeout"), 2.0) == 0  # another kind: a row of its own
    assert throttle.admit(("10.0.0.6", "missing"), 3.0) == 0  # another peer too
    assert throttle.admit(("10.0.0.5", "missing"), 60.0) == 3
    assert throttle.admit(("10.0.0.5", "missing"), 61.0) is None
    assert throttle.admit(("10.0.0.5", "missing"), 200.0) == 1


def test_memory_is_bounded_and_the_forgotten_start_afresh():
    throttle = RowThrottle(interval=60, max_keys=3)
    for n in range(10):
        assert throttle.admit(n, 0.0) == 0
    assert len(throttle._keys) == 3
    assert throttle.admit(9, 1.0) is None  # still remembered: the most recent
    assert throttle.admit(0, 1.0) == 0  # forgotten: a row again
