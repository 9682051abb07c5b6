"""TOML nested deeper than any bastion file needs (a policy file, config.toml) is a one-line error with exit 2, as
an operator meets it through the real CLI, never a RecursionError traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from bastion.toml_input import MAX_DEPTH, loads, nesting_depth

DEPTH = 3000  # tomllib recurses per level: far past the interpreter's limit


def bastion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bastion", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    return result.stderr


@pytest.mark.parametrize("value", [
    "[" * DEPTH + "]" * DEPTH,  # arrays
    "{a = " * DEPTH + "1" + "}" * DEPTH,  # inline tables
    "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),  # parses, but deeper than any policy needs
], ids=["arrays", "inline-tables", "just-past-the-limit"])
def test_policy_apply_refuses_a_deeply_nested_file_in_one_line(tmp_path, value):
    policy = tmp_path / "deep.toml"
    policy.write_text(f'[users.alice]\nallow = ["10.1.2.3:22"]\nlisten = {value}\n')
    # an invalid policy is refused (exit 1, a problem found), not a usage error
    error = assert_one_line_error(bastion("--home", str(tmp_path / "home"), "policy", "apply", str(policy)), code=1)
    assert error == (f"error: policy not applied: {policy}:4: tables and arrays nested more than {MAX_DEPTH} "
                     "levels deep; expected valid TOML\n")


def test_serve_and_doctor_refuse_a_deeply_nested_config(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text('listen = "127.0.0.1:0"\ninternal_networks = ' + "[" * DEPTH + "]" * DEPTH
                                      + "\n")
    error = assert_one_line_error(bastion("--home", str(home), "serve"))
    assert error == (f"error: {home / 'config.toml'}: invalid TOML: tables and arrays nested more than {MAX_DEPTH} "
                     "levels deep\n")
    doctor = bastion("--home", str(home), "doctor")
    assert_one_line_error(doctor, code=1)  # doctor reports what it found: a problem is exit 1
    assert f"invalid TOML: tables and arrays nested more than {MAX_DEPTH} levels deep" in doctor.stdout


def test_what_real_files_nest_is_far_below_the_limit():
    policy = loads('[users.alice]\nallow = [{to = "10.1.2.3:22", expires = "2030-01-01T00:00:00Z"}]\n')
    assert nesting_depth(policy) == 5 < MAX_DEPTH
    dotted = "[" + ".".join(["a"] * (MAX_DEPTH + 1)) + "]\n"  # built without recursion, refused all the same
    with pytest.raises(tomllib.TOMLDecodeError, match="nested more than"):
        loads(dotted)
