"""The benchmark bed: the sealed namespaces of the testbed package, the targets, both servers and the client side.

    gw  10.99.0.1   bastion :22 (home on disk), bastion :2223 (home on /dev/shm, audit figure only),
                    OpenSSH sshd :2222 as a jump host, every client (ssh, the drivers in clients.py)
    lan 10.99.0.2   bench/targets.py (source, sink, echo, hello) and the testbed's target sshd :22 (for -J)

Both servers are measured as process trees: the bastion is one process, or with `serve --workers N` (figure 6
at 10,000 sessions) its supervisor and the N workers it forked; sshd is its listener and every child it forked
(one privileged monitor plus one unprivileged child per session). CPU is utime+stime of
every live process plus what the tree's parents already reaped (cutime+cstime); memory is PSS summed,
so pages shared between sshd's processes are counted once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the testbed package at the repository's root, shared with the tests
from testbed import (  # noqa: E402
    GW_ADDR,
    LAN_ADDR,
    SSH,
    SSH_KEYGEN,
    SSHD,
    Bastion,
    Key,
    Testbed,
    TestbedError,
    clean_env,
    free_port,
    generate_key,
    start_targets,
    stop_process,
    wait_listening,
)

from targets import ECHO_PORT, HELLO_PORT, SINK_PORT, SOURCE_PORT  # noqa: E402

BENCH = Path(__file__).resolve().parent
CLIENTS = BENCH / "clients.py"
TARGETS = BENCH / "targets.py"
KEX = "curve25519-sha256"  # pinned: OpenSSH 9.2 would pick sntrup761x25519 with sshd, which asyncssh lacks
DEFAULT_CIPHER = "aes128-gcm@openssh.com"
# TCP congestion control in the bench's namespaces: Linux's default, whatever the host has chosen. On paths
# with no delay, such as these, bbr paces each sender to the rate it last saw delivered, and client, server
# and targets, sharing two cores, then wait on its timers: both servers move less, with more spread between
# rounds, and the cores idle (bench/README.md, "Congestion control"). "host" keeps the host's choice.
CONGESTION_CONTROL = "cubic"
HOST_CC = "host"
OURS_PORT, SSHD_PORT, OURS_TMPFS_PORT = 22, 2222, 2223
JUMP_USER, JUMP_UID = "benchjump", 64999  # sshd's user, in sshd's private copy of /etc/passwd

# Raised for the load figures, as MaxStartups is for sshd: every bench client is one user from one address.
# Set only where `init` wrote the key, so the bench runs against older and newer bastions alike.
BASTION_LOAD_SETTINGS = {
    "max_startups": "10000",
    "max_sessions_per_user": 1_000_000,
    "max_channels_per_user": 1_000_000,
    "penalty_threshold": 1_000_000,
    "shutdown_grace_seconds": 2,
}

BENCH_POLICY = f"""\
[users.alice]
allow = ["{LAN_ADDR}:22,{SOURCE_PORT}-{HELLO_PORT}"]
"""

# Login modes for figures 4 and 5 (`run.py --login key,cert,totp`, issue #21). "key" is the bench as it always
# was; the others are extra measurements of the same bastion process, sshd staying the key-login reference.
LOGINS = {"key": "", "cert": "certificate login", "totp": "key + TOTP"}
CERT_USER = "certuser"  # no key in the store: only its certificate, from the CA [cas.bench], logs it in
TOTP_USERS = 4000  # bt0000…: a TOTP code is good once per 30 s step per user, so each login takes a user unused
TOTP_GROUP = "totp"  # in the current step (clients.py, TotpPool): 4000 users cover 133 logins/s for a whole step
TOTP_PREFIX = "bt"

SSHD_CONFIG = """\
Port {port}
ListenAddress {addr}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
UsePAM no
StrictModes no
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# A jump host: direct-tcpip anywhere (the bastion checks policy; sshd has none to check), nothing else.
# "local" allows exactly what "yes" allows for -J/-W/-L/-D and refuses -R, as the bastion does.
AllowTcpForwarding local
PermitOpen any
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTTY no
PermitTunnel no
ForceCommand /bin/false
# Raised for the load figures: concurrent handshakes and a thousand sessions.
MaxStartups 10000
MaxSessions 100
LoginGraceTime 30
UseDNS no
PrintMotd no
LogLevel INFO
"""

SSH_CONFIG = """\
Host ours
  HostName {gw}
  Port {ours_port}
  User alice
Host ours-tmpfs
  HostName {gw}
  Port {ours_tmpfs_port}
  User alice
Host sshd
  HostName {gw}
  Port {sshd_port}
  User {jump_user}
Host ours ours-tmpfs sshd
  IdentityFile {identity}
Host target
  HostName {lan}
  User root
  IdentityFile {target_identity}
Host *
  IdentitiesOnly yes
  BatchMode yes
  ConnectTimeout 30
  UserKnownHostsFile {known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  HostKeyAlgorithms ssh-ed25519
  KexAlgorithms {kex}
  Ciphers {cipher}
  Compression no
  ControlMaster no
  ControlPath none
  ForwardAgent no
  ForwardX11 no
  LogLevel ERROR
"""


@dataclass
class Server:
    """One server under test, as the clients see it (an ssh_config alias) and as the bench measures it."""

    name: str  # ours | sshd | ours-tmpfs
    alias: str
    port: int
    user: str
    proc: subprocess.Popen | None = None
    workers: int = 1  # the bastion's `workers` (processes sharing the port); 1 for sshd
    login: str = "key"  # key | cert | totp (LOGINS)
    same_as: "Server | None" = None  # a login mode of another server: the same process, measured as it


    @property
    def pid(self) -> int:
        proc = self.same_as.proc if self.same_as is not None else self.proc
        assert proc is not None and proc.poll() is None, f"{self.name} is not running"
        return proc.pid

    def processes(self) -> list[psutil.Process]:
        """The whole tree: sshd's listener and its children, or the bastion (supervisor and workers)."""
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def descriptors(self) -> list[int]:
        """Open descriptors of each process in the tree, largest first."""
        counts = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                counts.append(proc.num_fds())
        return sorted(counts, reverse=True)

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def pss_kib(self) -> tuple[int, int]:
        """(PSS summed over the tree in KiB, number of processes)."""
        total = count = 0
        for proc in self.processes():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        count += 1
                        break
        return total, count


ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")


def set_congestion_control(tb: Testbed, name: str) -> str | None:
    """Every new TCP connection in the testbed's namespaces uses `name` (see CONGESTION_CONTROL). A namespace
    may only pick an algorithm the host allows: one it does not is added to the host's allowed list, and the
    list as it was is returned, for the caller to write back when done (None: nothing to put back)."""
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    if name not in available:
        raise TestbedError(f"congestion control {name!r} is not available here (available: {available})")
    before = ALLOWED_CC.read_text().strip()
    widened = name not in before.split()
    if widened:
        ALLOWED_CC.write_text(f"{before} {name}")
    try:
        for ns in (tb.gw, tb.lan):
            tb.run(ns, ["sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={name}"], check=True)
    except BaseException:
        if widened:
            ALLOWED_CC.write_text(before)
        raise
    return before if widened else None


class Bench:
    """Everything one benchmark run needs; a context manager that tears it all down."""

    def __init__(self, bastion_src: Path = ROOT, log=print, event_loop: str | None = None,
                 congestion_control: str = CONGESTION_CONTROL, logins: tuple[str, ...] = ("key",)) -> None:
        self.log = log
        self.logins = logins  # figures 4 and 5 measure the bastion once per login mode
        self.event_loop = event_loop
        self.congestion_control = congestion_control  # in the bench's namespaces; HOST_CC leaves the host's
        self._allowed_before: str | None = None  # the host's allowed list, while the bench has widened it
        self.bastion_src = bastion_src
        self.bastion_digest = ""
        self.bastion_settings: dict = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/var/tmp"))
        self.shmdir = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/dev/shm"))
        self.testbed = Testbed(self.workdir / "bed")
        self.ours = Server("ours", "ours", OURS_PORT, "alice")
        self.sshd = Server("sshd", "sshd", SSHD_PORT, JUMP_USER)
        self.ours_tmpfs = Server("ours-tmpfs", "ours-tmpfs", OURS_TMPFS_PORT, "alice")
        # the bastion again, logged into otherwise (figures 4 and 5 only); "{user}" is a TOTP user per login
        self.login_variants = [Server(f"ours-{login}", f"ours-{login}", OURS_PORT,
                                      CERT_USER if login == "cert" else "{user}", login=login, same_as=self.ours)
                               for login in logins if login != "key"]
        self.cert_key: Key | None = None  # its certificate is cert_key.path + "-cert.pub"
        self.totp_key: Key | None = None
        self.totp_users = self.workdir / "totp_users.json"  # [[name, secret], ...]
        self.totp_state = self.workdir / "totp_state"  # clients.py records each user's last step used here
        self.askpass = self.workdir / "askpass.sh"
        self._bastions: dict[str, Bastion] = {}
        self._targets: subprocess.Popen | None = None
        self.alice: Key | None = None
        self.ssh_config = self.workdir / "ssh_config"

    # ---- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "Bench":
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        self._freeze_bastion()
        # Children inherit this: the bastion needs two descriptors per session (client and target).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        tb = self.testbed.create()
        for ns in (tb.gw, tb.lan):  # per-namespace settings: the load figures open many short connections
            tb.run(ns, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                        "net.ipv4.ip_local_port_range=1024 65000"], check=True)
        if self.congestion_control != HOST_CC:
            self._allowed_before = set_congestion_control(tb, self.congestion_control)
        self.congestion_control = tb.run(tb.gw, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                                         check=True).stdout.decode().strip()
        start_targets(tb)  # the testbed's target sshd on 10.99.0.2:22 is the end of `ssh -J ... target`
        self._targets = tb.popen(tb.lan, [sys.executable, TARGETS], stdout=subprocess.DEVNULL,
                                 stderr=(self.workdir / "targets.log").open("wb"))
        for port in (SOURCE_PORT, SINK_PORT, ECHO_PORT, HELLO_PORT):
            wait_listening(self._targets, port, "bench targets")

        keys = self.workdir / "keys"
        self.alice = generate_key(keys / "alice", "alice")
        self._sshd_host_key = generate_key(keys / "sshd_host_ed25519_key", "bench-sshd")
        for server, home in ((self.ours, self.workdir / "home"), (self.ours_tmpfs, self.shmdir / "home")):
            bastion = Bastion(tb, home, listen=f"{GW_ADDR}:{server.port}")
            bastion.init()
            written = (home / "config.toml").read_text()
            settings = {k: v for k, v in BASTION_LOAD_SETTINGS.items() if f"\n{k} =" in f"\n{written}"}
            if self.event_loop:
                if "\nevent_loop =" not in f"\n{written}":
                    raise TestbedError(f"--event-loop: the bastion in {self.bastion_src} has no event_loop setting")
                settings["event_loop"] = self.event_loop
            elif match := re.search(r'^event_loop = "(\w+)"', written, re.M):
                settings["event_loop"] = match.group(1)  # recorded as run; set_config writes it back unchanged
            bastion.set_config(**settings)
            self.bastion_settings = settings
            bastion.add_user("alice", self.alice)
            if server is self.ours and self.login_variants:
                bastion.apply_policy(BENCH_POLICY + self._login_setup(keys))
                if "totp" in self.logins:
                    self._enrol_totp_users(bastion)
            else:
                bastion.apply_policy(BENCH_POLICY)
            self._bastions[server.name] = bastion
        self._write_ssh_config()
        self.start(self.ours)
        self.start(self.sshd)

    def _login_setup(self, keys: Path) -> str:
        """Keys, certificate and policy for the login modes other than "key"; returns the policy to add."""
        allow = f'allow = ["{LAN_ADDR}:22,{SOURCE_PORT}-{HELLO_PORT}"]'
        policy = ""
        if "cert" in self.logins:
            # its own key: a -cert.pub beside alice's key would make OpenSSH offer it in the key-login figures
            self.cert_key = generate_key(keys / CERT_USER, CERT_USER)
            ca = generate_key(keys / "bench_user_ca", "bench-ca")
            subprocess.run([SSH_KEYGEN, "-q", "-s", ca.path, "-I", "bench-cert", "-n", CERT_USER, "-V", "-5m:+2d",
                            "-z", "1", self.cert_key.pub_path], check=True, timeout=30)
            policy += f'\n[cas.bench]\nkey = "{ca.public}"\n\n[users.{CERT_USER}]\n{allow}\n'
        if "totp" in self.logins:
            self.totp_key = generate_key(keys / "totp", "totp")
            policy += f"\n[groups.{TOTP_GROUP}]\n{allow}\nrequire_totp = true\n"
            policy += "".join(f'\n[users.{TOTP_PREFIX}{i:04d}]\ngroups = ["{TOTP_GROUP}"]\n' for i in range(TOTP_USERS))
            self.askpass.write_text('#!/bin/sh\nprintf \'%s\\n\' "$BENCH_TOTP_CODE"\n')
            self.askpass.chmod(0o755)
            self.totp_state.mkdir(exist_ok=True)
        return policy

    def _enrol_totp_users(self, bastion: Bastion) -> None:
        """The TOTP users' key and secrets, through the store's own calls (`user add-key`/`user totp enroll`
        would be one process each, 0.5 s apiece), in the frozen copy of the bastion."""
        assert self.totp_key is not None
        script = f"""
import json, sys
import pyotp
from bastion.config import DATABASE_FILE
from bastion.store.sqlite import Store, parse_public_keys
home, names = sys.argv[1], sys.argv[2:]
store = Store(__import__("pathlib").Path(home) / DATABASE_FILE)
key = parse_public_keys({self.totp_key.public!r})
store.import_keys({{name: key for name in names}}, create=False)
pairs = []
for name in names:
    secret = pyotp.random_base32()
    store.totp_enroll(name, secret)
    pairs.append([name, secret])
store.close()
print(json.dumps(pairs))
"""
        names = [f"{TOTP_PREFIX}{i:04d}" for i in range(TOTP_USERS)]
        done = subprocess.run([sys.executable, "-c", script, str(bastion.home), *names], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise TestbedError(f"enrolling the TOTP users failed: {done.stderr[-2000:]}")
        self.totp_users.write_text(done.stdout)

    def _freeze_bastion(self) -> None:
        """Run the bastion from a copy of its package taken now: the tree may change under a long run
        (others edit it), and every figure must measure the same code. The copy is first on PYTHONPATH
        and the bench works from its own directory, so `python -m bastion` cannot find the repo's."""
        source = self.bastion_src / "bastion"
        if not (source / "__main__.py").exists():
            raise TestbedError(f"{source} is not the bastion package")
        frozen = self.workdir / "src"
        shutil.copytree(source, frozen / "bastion", ignore=shutil.ignore_patterns("__pycache__"))
        digest = hashlib.sha256()
        for path in sorted((frozen / "bastion").rglob("*.py")):
            digest.update(path.relative_to(frozen).as_posix().encode() + b"\0" + path.read_bytes())
        self.bastion_digest = digest.hexdigest()[:12]
        os.environ["PYTHONPATH"] = str(frozen)
        os.chdir(self.workdir)
        check = subprocess.run([sys.executable, "-c", "import bastion.cli.main, bastion; print(bastion.__file__)"],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0 or not check.stdout.startswith(str(frozen)):
            raise TestbedError(f"the bastion in {source} does not import (mid-edit?); use --bastion-src DIR:\n"
                               f"{check.stderr[-1500:]}{check.stdout}")

    def close(self) -> None:
        os.chdir(ROOT)
        if self._allowed_before is not None:
            with contextlib.suppress(OSError):
                ALLOWED_CC.write_text(self._allowed_before)
            self._allowed_before = None
        for name, bastion in self._bastions.items():
            with contextlib.suppress(Exception):
                bastion.close()
        for proc in (self.sshd.proc, self._targets):
            if proc is not None:
                with contextlib.suppress(Exception):
                    stop_process(proc)
        try:
            self.testbed.close()  # kills what is left in our namespaces by pid, deletes them
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            left = [ns for ns in (self.testbed.gw, self.testbed.lan) if ns in names]
            self.log(f"namespaces {self.testbed.gw}, {self.testbed.lan}: " + (f"LEFT BEHIND: {left}" if left else "removed"))
        finally:
            shutil.rmtree(self.shmdir, ignore_errors=True)
            if not os.environ.get("BENCH_KEEP"):
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- servers --------------------------------------------------------------------------------

    def start(self, server: Server) -> None:
        if server.name == "sshd":
            self._start_sshd()
        else:
            bastion = self._bastions[server.name]
            bastion.start(timeout=30)  # returns at the first "listening on", i.e. the first worker's
            server.proc = bastion.proc
            if server.workers > 1:
                self._wait_workers(server, bastion)

    def _wait_workers(self, server: Server, bastion: Bastion, timeout: float = 30.0) -> None:
        """Every worker listening: until then SO_REUSEPORT hands every connection to the ones that are."""
        deadline = time.monotonic() + timeout
        while True:
            since_start = bastion.log().rsplit("----- bastion serve started", 1)[-1]
            up = sum(1 for line in since_start.splitlines() if "listening on" in line and "(worker " in line)
            if up >= server.workers:
                return
            if bastion.proc is None or bastion.proc.poll() is not None:
                raise TestbedError(f"{server.name} exited while its workers started:\n{bastion.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TestbedError(f"{server.name}: {up} of {server.workers} workers listening after {timeout}s:\n"
                                   f"{bastion.log()[-3000:]}")
            time.sleep(0.05)

    def set_workers(self, server: Server, workers: int) -> bool:
        """Run the bastion `server` with `workers` processes (its config.toml's `workers`, what
        `serve --workers` overrides), restarting it if it runs. False if this bastion has no such setting."""
        if server.name == "sshd":
            return workers == 1
        if workers == server.workers:
            return True
        bastion = self._bastions[server.name]
        if "\nworkers =" not in "\n" + (bastion.home / "config.toml").read_text():
            return False
        running = server.proc is not None and server.proc.poll() is None
        self.stop(server)
        bastion.set_config(workers=workers)
        server.workers = workers
        if running:
            self.start(server)
        return True

    def stop(self, server: Server) -> None:
        if server.proc is None or server.proc.poll() is not None:
            return
        if server.name == "sshd":
            stop_process(server.proc)
        else:
            self._bastions[server.name].stop(timeout=60)
        server.proc = None

    def restart(self, server: Server) -> None:
        self.stop(server)
        self.start(server)

    def _start_sshd(self) -> None:
        """sshd in its own mount namespace, where /etc/passwd and /etc/shadow are copies with one more user,
        JUMP_USER: a jump host's users are not root, and for root sshd skips the unprivileged child it forks
        for every other user, which would understate its memory and CPU per session. The host's files are
        not touched (unshare -m makes the bind mounts private to sshd and its children)."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.workdir.chmod(0o755)  # the unprivileged child reads the authorized keys as JUMP_USER
        etc = self.workdir / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "passwd").write_text(Path("/etc/passwd").read_text().rstrip("\n")
                                    + f"\n{JUMP_USER}:x:{JUMP_UID}:65534:bastion bench:{self.workdir}:/bin/sh\n")
        # sshd looks up only the logging-in user in shadow: one line, no copy of the host's entries
        shadow = f"{JUMP_USER}:*:19000:0:99999:7:::\n"
        fd = os.open(etc / "shadow", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(shadow)
        authorized = self.workdir / "sshd_authorized_keys"
        assert self.alice is not None
        authorized.write_text(self.alice.public + "\n")
        authorized.chmod(0o644)
        config = self.workdir / "sshd_config"
        config.write_text(SSHD_CONFIG.format(
            port=SSHD_PORT, addr=GW_ADDR, host_key=self._sshd_host_key.path,
            pid_file=self.workdir / "sshd.pid", authorized_keys=authorized))
        log = (self.workdir / "sshd.log").open("ab")
        script = (f'mount --bind {etc}/passwd /etc/passwd && mount --bind {etc}/shadow /etc/shadow && '
                  f'exec {SSHD} -D -e -f {config}')
        # unshare and sh exec in turn, so the pid we hold is sshd's own (the listener)
        self.sshd.proc = self.testbed.popen(self.testbed.gw, ["unshare", "-m", "--propagation", "private",
                                                              "sh", "-c", script],
                                            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_listening(self.sshd.proc, SSHD_PORT, "bench sshd")

    def _login_ssh_config(self) -> str:
        """Host blocks for the login modes; before `Host *` (the first value ssh_config finds wins)."""
        text = ""
        if self.cert_key is not None:
            text += (f"Host ours-cert\n  HostName {GW_ADDR}\n  Port {OURS_PORT}\n  User {CERT_USER}\n"
                     f"  IdentityFile {self.cert_key.path}\n  CertificateFile {self.cert_key.path}-cert.pub\n")
        if self.totp_key is not None:  # the user is given per login (user@ours-totp); the code by SSH_ASKPASS
            text += (f"Host ours-totp\n  HostName {GW_ADDR}\n  Port {OURS_PORT}\n  IdentityFile {self.totp_key.path}\n"
                     "  BatchMode no\n  KbdInteractiveAuthentication yes\n"
                     "  PreferredAuthentications publickey,keyboard-interactive\n")
        return text

    def login_args(self, server: Server) -> list[str]:
        """clients.py options for a login mode (jump and handshake drivers)."""
        if server.login == "cert":
            assert self.cert_key is not None
            return ["--login", "cert", "--cert", f"{self.cert_key.path}-cert.pub"]
        if server.login == "totp":
            return ["--login", "totp", "--totp-users", str(self.totp_users), "--totp-state", str(self.totp_state),
                    "--askpass", str(self.askpass)]
        return []

    def jump_host(self, server: Server) -> str:
        """What goes after -J or as the host of -W: the alias, with the per-login user placeholder for TOTP."""
        return f"{{user}}@{server.alias}" if server.login == "totp" else server.alias

    def _write_ssh_config(self) -> None:
        known = [f"{GW_ADDR} {_key_blob(p)}" for p in self._bastions["ours"].host_public_keys()]
        known += [f"[{GW_ADDR}]:{OURS_TMPFS_PORT} {_key_blob(p)}"
                  for p in self._bastions["ours-tmpfs"].host_public_keys()]
        known.append(f"[{GW_ADDR}]:{SSHD_PORT} {_key_blob(self._sshd_host_key.public)}")
        assert self.testbed.target_host_key is not None and self.testbed.target_client_key is not None
        known.append(f"{LAN_ADDR} {_key_blob(self.testbed.target_host_key.public)}")
        known_hosts = self.workdir / "known_hosts"
        known_hosts.write_text("\n".join(known) + "\n")
        assert self.alice is not None
        self.ssh_config.write_text(self._login_ssh_config() + SSH_CONFIG.format(
            gw=GW_ADDR, lan=LAN_ADDR, ours_port=OURS_PORT, ours_tmpfs_port=OURS_TMPFS_PORT, sshd_port=SSHD_PORT,
            identity=self.alice.path, target_identity=self.testbed.target_client_key.path,
            known_hosts=known_hosts, kex=KEX, cipher=DEFAULT_CIPHER, jump_user=JUMP_USER))

    def server_log(self, server: Server) -> str:
        if server.name == "sshd":
            return (self.workdir / "sshd.log").read_text(errors="replace")[-3000:]
        return self._bastions[server.name].log()[-3000:]

    # ---- clients --------------------------------------------------------------------------------

    def ssh_argv(self, *args: str) -> list[str]:
        return [SSH, "-F", str(self.ssh_config), *args]

    @contextlib.contextmanager
    def forwards(self, server: Server, target_ports: list[int], cipher: str = DEFAULT_CIPHER,
                 one_connection: bool = True) -> Iterator[list[int]]:
        """`ssh -N -L` to the targets through `server`; yields the local ports. One SSH connection for all
        of them, or (one_connection=False) one connection per forward."""
        local_ports: list[int] = []
        while len(local_ports) < len(target_ports):
            port = free_port(self.testbed.gw)
            if port not in local_ports:
                local_ports.append(port)
        specs = [["-L", f"127.0.0.1:{lp}:{LAN_ADDR}:{tp}"] for lp, tp in zip(local_ports, target_ports)]
        groups = [sum(specs, [])] if one_connection else specs
        procs: list[tuple[subprocess.Popen, list[int]]] = []
        log = (self.workdir / "ssh-client.log").open("ab")
        try:
            for i, group in enumerate(groups):
                argv = self.ssh_argv("-N", "-o", "ExitOnForwardFailure=yes", "-c", cipher, *group, server.alias)
                proc = self.testbed.popen(self.testbed.gw, argv, stdout=subprocess.DEVNULL, stderr=log)
                procs.append((proc, local_ports if one_connection else [local_ports[i]]))
            for proc, ports in procs:
                for port in ports:
                    wait_listening(proc, port, f"ssh -L through {server.name}", timeout=60)
            yield local_ports
        finally:
            log.close()
            for proc, _ in procs:
                stop_process(proc)

    def client(self, *args: str | int, timeout: float = 600) -> dict:
        """Run one driver from clients.py in gw and return its JSON."""
        argv = [sys.executable, str(CLIENTS), *map(str, args)]
        result = self.testbed.run(self.testbed.gw, argv, timeout=timeout)
        if result.returncode != 0:
            raise TestbedError(f"clients.py {' '.join(map(str, args[:3]))} exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace')[-1500:]}")
        return json.loads(result.stdout.decode().strip().splitlines()[-1])

    def client_popen(self, *args: str | int) -> subprocess.Popen:
        argv = [sys.executable, str(CLIENTS), *map(str, args)]
        return self.testbed.popen(self.testbed.gw, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=(self.workdir / "clients.log").open("ab"), env=clean_env())

    def asyncssh_args(self, server: Server) -> list[str]:
        assert self.alice is not None
        key = {"cert": self.cert_key, "totp": self.totp_key}.get(server.login) or self.alice
        return ["--host", GW_ADDR, "--port", str(server.port), "--user", server.user, "--key", str(key.path),
                "--kex", KEX, "--cipher", DEFAULT_CIPHER, *self.login_args(server)]


def machine_cpu_seconds() -> dict[str, float]:
    """The machine's CPU time since boot by kind (user, nice, system, idle, iowait, irq, softirq, steal), in
    seconds: the first line of /proc/stat."""
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    ticks = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    tick = os.sysconf("SC_CLK_TCK")
    return {kind: int(value) / tick for kind, value in zip(kinds, ticks)}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy, irq and softirq included (the loopback and veth packets
    of a transfer are processed there), steal left out."""
    t = machine_cpu_seconds()
    return t["user"] + t["nice"] + t["system"] + t["irq"] + t["softirq"]


def fd_limit() -> int:
    """RLIMIT_NOFILE of one process here: Bench.setup raised the soft limit to the hard one, and every server,
    target and client inherits it. The hard limit cannot be raised here (setrlimit and prlimit refuse, as root too)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _key_blob(public_line: str) -> str:
    return " ".join(public_line.split()[:2])


def wait_quiet(server: Server, seconds: float = 0.5, timeout: float = 30.0) -> None:
    """Wait until the server's CPU use settles (sessions torn down, audit written) before the next figure."""
    deadline = time.monotonic() + timeout
    last = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = server.cpu_seconds()
        if now - last < 0.02 * seconds:
            return
        last = now
