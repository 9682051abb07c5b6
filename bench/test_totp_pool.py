"""The TOTP users of `run.py --login totp` (bench/clients.py TotpPool): the bastion takes a user's code once per
30 s step, so the pool must never hand out one user twice in a step, in one process or across the processes that
follow it, and the code it gives must be the one the bastion's own check accepts for that step."""

import json

import pyotp

from bastion.policy.totp import check_code
from clients import TotpPool


def _users(tmp_path, count):
    pairs = [[f"bt{i:04d}", pyotp.random_base32()] for i in range(count)]
    path = tmp_path / "users.json"
    path.write_text(json.dumps(pairs))
    state = tmp_path / "state"
    state.mkdir()
    return str(path), str(state), dict(pairs)


def test_no_user_twice_in_a_step_within_a_process_and_across_processes(tmp_path, monkeypatch):
    users, state, _ = _users(tmp_path, 6)
    monkeypatch.setattr(TotpPool, "step", classmethod(lambda cls: 1000))
    first = TotpPool(users, state, 0, 1)
    taken = []
    while (name := first.take()) is not None:
        first.code(name)
        taken.append(name)
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 6  # then none is free: the login waits
    first.save()
    assert TotpPool(users, state, 0, 1).take() is None  # the next process reads what this one used
    halves = [TotpPool(users, state, slot, 2) for slot in (0, 1)]  # processes at once take disjoint halves
    assert not set(halves[0].totp) & set(halves[1].totp)
    monkeypatch.setattr(TotpPool, "step", classmethod(lambda cls: 1001))
    assert TotpPool(users, state, 0, 1).take() is not None  # a new step frees them


def test_the_code_given_is_the_one_the_bastion_accepts_once(tmp_path):
    users, state, secrets = _users(tmp_path, 1)
    pool = TotpPool(users, state, 0, 1)
    name = pool.take()
    code = pool.code(name)
    step = pool.used[name]
    assert check_code(secrets[name], code, step * 30 + 1, None).step == step
    assert check_code(secrets[name], code, step * 30 + 1, step).accepted is False  # a second use: refused
    assert pool.take() is None
