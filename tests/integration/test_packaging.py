"""`pip install .` (not only editable) gives a working `bastion`: build the wheel, install it apart from
the source tree, and run the console entry point from a directory where the source is not importable."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_installs_a_working_cli(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
        check=True, timeout=180, capture_output=True,
    )
    [wheel] = wheels.glob("bastion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("bastion/gateway/connection.py", "bastion/cli/main.py", "bastion/policy/model.py"):
        assert module in names
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "bastion = bastion.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
                   check=True, timeout=180, capture_output=True)
    # The dependencies come from this venv; the package itself only from the installed wheel.
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    home = tmp_path / "home"
    run = subprocess.run(
        [sys.executable, "-c", "import bastion, sys; print(bastion.__file__); "
         "sys.argv = ['bastion', '--home', sys.argv[1], 'init']; from bastion.cli.main import main; main()", home],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith(str(target))
    assert (home / "ssh_host_ed25519_key").stat().st_mode & 0o077 == 0
    assert (home / "bastion.db").exists()
