"""Benchmark the bastion against OpenSSH's sshd used as a jump host (issue #6). Needs root (namespaces).

    .venv/bin/python bench/run.py [--quick] [--only bulk,latency,...] [--json out.json] [--markdown out.md]
    .venv/bin/python bench/run.py --profile [--quick]        # py-spy on the bastion during bulk -L
    .venv/bin/python bench/run.py --only latency,handshakes --login key,cert,totp   # figures 4 and 5 per login

Both servers run at once in one sealed namespace, are driven by the same clients (OpenSSH 'ssh', or the
asyncssh drivers in clients.py for load), and are measured in turns: ours, sshd, ours, sshd, ...
Prints a table (ours, sshd, ours/sshd) and writes JSON. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bed import CONGESTION_CONTROL, HOST_CC, KEX, LOGINS, ROOT, SSH, SSHD, Bench, machine_cpu_seconds  # noqa: E402
from figures import FIGURES, FULL, QUICK, Row  # noqa: E402

console = Console(stderr=True, highlight=False)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
    ssh_version = subprocess.run([SSH, "-V"], capture_output=True, text=True).stderr.strip()
    import asyncssh
    import cryptography

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "openssh": ssh_version,
        "sshd": SSHD,
        "python": platform.python_version(),
        "asyncssh": asyncssh.__version__,
        "cryptography": cryptography.__version__,
        "kex": KEX,
        "host_congestion_control": Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip(),
    }


def cpu_accounts() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of this process and every child it reaped, steal seconds).
    The first minus the second is what other work on the machine took while the bench ran. irq and softirq
    are left out of both: loopback and veth packets are processed there and charged to no process."""
    t = machine_cpu_seconds()
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return t["user"] + t["nice"] + t["system"], own, t.get("steal", 0.0)


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(rows: list[Row], meta: dict) -> None:
    table = Table(title=f"bastion vs OpenSSH sshd — {meta['nproc']} cores, {meta['cpu']}, {meta['date']}, "
                        f"TCP {meta.get('congestion_control', '?')}")
    for name, justify in (("#", "right"), ("measure", "left"), ("direction", "left"), ("unit", "left"),
                          ("ours", "right"), ("sshd", "right"), ("ours/sshd", "right"), ("note", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in rows:
        ratio = row.ratio
        good = ratio is not None and ((ratio >= 0.95) if row.better == "higher" else (ratio <= 1.05))
        ratio_text = "–" if ratio is None else f"[{'green' if good else 'red'}]{ratio:.2f}[/]"
        note = row.note if row.reference == "sshd" else f"{row.note} (second column: {row.reference})"
        table.add_row(str(row.figure), row.measure, row.direction, f"{row.unit} ({row.better} is better)",
                      fmt(row.ours), fmt(row.sshd), ratio_text, note)
    Console(width=200).print(table)


def markdown(rows: list[Row], meta: dict, mode: str) -> str:
    lines = [
        f"Machine: {meta['nproc']} cores ({meta['cpu']}), {meta['memory_gib']} GiB, Linux {meta['kernel']}; "
        f"{meta['openssh']}; Python {meta['python']}, asyncssh {meta['asyncssh']}. "
        f"TCP congestion control in the bench's namespaces: {meta.get('congestion_control', '?')} "
        f"(the host's: {meta.get('host_congestion_control', '?')}). "
        f"Date: {meta['date']}. Mode: {mode}, {meta['seconds']:.0f} s. Bastion code: {meta.get('bastion_digest', '?')}. "
        f"Other work on the machine during the run: {meta.get('other_work_cpu_share', 0):.0%} of its CPU.",
        "",
        "| # | measure | direction | unit | ours | sshd | ours/sshd | note |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = "–" if row.ratio is None else f"{row.ratio:.2f}"
        note = row.note.replace("|", "\\|")
        lines.append(f"| {row.figure} | {row.measure} | {row.direction} | {row.unit} ({row.better} is better) "
                     f"| {fmt(row.ours)} | {fmt(row.sshd)} | {ratio} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few sessions (< 3 minutes)")
    parser.add_argument("--only", default="", help=f"comma list of figures: {','.join(FIGURES)}")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown (for the README)")
    parser.add_argument("--bastion-src", type=Path, default=ROOT,
                        help="directory holding the bastion package to run (default: this repository)")
    parser.add_argument("--profile", action="store_true", help="profile the bastion with py-spy during bulk -L")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"),
                        help="the bastion's event_loop setting (default: what `init` writes)")
    parser.add_argument("--congestion-control", default=CONGESTION_CONTROL, metavar="NAME",
                        help=f"TCP congestion control in the bench's namespaces (default {CONGESTION_CONTROL}, "
                             f"Linux's default; '{HOST_CC}' keeps the host's)")
    parser.add_argument("--login", default="key", metavar="MODES",
                        help="comma list of how the user logs in to the bastion in figures 4 and 5: key (as always), "
                             "cert (an OpenSSH user certificate from a CA the policy trusts), totp (key, then a "
                             "one-time code); each mode is measured and labelled apart, sshd always with a key")
    args = parser.parse_args()
    logins = tuple(dict.fromkeys(m.strip() for m in args.login.split(",") if m.strip()))
    if "key" not in logins or any(m not in LOGINS for m in logins):
        parser.error(f"--login: a comma list of {','.join(LOGINS)} that includes key (the reference)")
    if os.geteuid() != 0:
        console.print("bench/run.py needs root: it creates network namespaces (see /work/shared/TESTBED.md)")
        return 2
    params = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    if args.profile:
        from profile_bulk import profile

        return profile(args, params)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {','.join(FIGURES)}")

    meta = machine()
    meta["loadavg_at_start"] = os.getloadavg()
    accounts_before = cpu_accounts()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    started = time.monotonic()
    with Bench(args.bastion_src, log=lambda text: console.print(text, markup=False),
               event_loop=args.event_loop, congestion_control=args.congestion_control, logins=logins) as bench:
        meta["bastion_digest"] = bench.bastion_digest
        meta["congestion_control"] = bench.congestion_control
        meta["bastion_settings"] = bench.bastion_settings
        meta["logins"] = list(logins)
        console.print(f"bench in {bench.workdir} ({mode}); namespaces {bench.testbed.gw}, {bench.testbed.lan}")
        for name in names:
            console.print(f"[bold]{name}[/]")
            t0 = time.monotonic()
            try:
                rows += FIGURES[name](bench, params)
            except Exception as exc:  # one broken figure must not lose the others' numbers
                errors[name] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{name} failed: {errors[name]}[/]")
                for server in (bench.ours, bench.sshd):
                    if server.proc is None or server.proc.poll() is not None:
                        console.print(f"{server.name} is not running; log tail:\n{bench.server_log(server)}",
                                      markup=False)
                        bench.start(server)
            timings[name] = round(time.monotonic() - t0, 1)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["loadavg_at_end"] = os.getloadavg()
    busy, own, steal = (after - before for after, before in zip(cpu_accounts(), accounts_before))
    capacity = meta["seconds"] * (os.cpu_count() or 1)
    meta["other_work_cpu_share"] = round(max(0.0, busy - own) / capacity, 3)
    meta["steal_share"] = round(steal / capacity, 3)
    if meta["other_work_cpu_share"] > 0.05 or meta["steal_share"] > 0.05:
        console.print(f"[yellow]warning: other work on this machine used {meta['other_work_cpu_share']:.0%} of its "
                      f"CPU during the run (steal {meta['steal_share']:.0%}); absolute numbers are noisy, "
                      f"ratios less so (the runs were interleaved)[/]")
    meta["mode"] = mode
    if len(logins) > 1 and not {"latency", "handshakes"} & set(names):
        console.print("[yellow]--login changes only figures 4 (latency) and 5 (handshakes)[/]")
    rows.sort(key=lambda r: r.figure)
    print_table(rows, meta)
    report = {"machine": meta, "params": asdict(params), "figure_seconds": timings, "errors": errors,
              "rows": [dict(asdict(r), ratio=r.ratio) for r in rows]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, meta, mode))
    print(json.dumps({"machine": meta, "errors": errors,
                      "rows": [{k: v for k, v in dict(asdict(r), ratio=r.ratio).items() if k != "detail"}
                               for r in rows]}, default=str))
    console.print(f"done in {meta['seconds']:.0f} s" + (f"; failed figures: {', '.join(errors)}" if errors else ""))
    return 1 if errors or any(r.note.startswith("CHECK FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
