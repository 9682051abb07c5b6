"""More than two hosts (/work/shared/TESTBED.md, "a bridge"): a switch namespace holding a Linux bridge, and one
namespace per host joined to it by a veth pair, each with one address in FLEET_NET and no default route. For a
load balancer in front of several bastion nodes (#22), and later a database host.

    bt-sw-XXXX     br0, the switch
    bt-NAME-XXXX   one per host: eth0 with its address, lo

Built on Testbed for running things inside (run, popen, start, close: kill by pid, delete the namespaces,
remove the /etc/netns files); `node(ns)` is the view a Bastion (bastion_process.py) needs to run in a host's
namespace instead of gw. `partition(host, peer)` / `heal(host, peer)` cut one host off from another silently
(nftables drops inside the host's namespace: no RST, no ICMP, as a dead link or a firewall would), the rest of
the bridge untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.namespaces import PREFIX_LEN, Testbed
from testbed.processes import run

FLEET_NET = "10.98.0"


@dataclass
class NodeView:
    """What Bastion uses of a Testbed, with `gw` being the host's namespace: `Bastion(fleet.node(ns), home, …)`."""

    fleet: "Fleet"
    gw: str
    target_host_key: None = None
    target_client_key: None = None

    def run(self, ns, argv, **kw):
        return self.fleet.run(ns, argv, **kw)

    def popen(self, ns, argv, **kw):
        return self.fleet.popen(ns, argv, **kw)

    def argv(self, ns, argv):
        return self.fleet.argv(ns, argv)


class Fleet(Testbed):
    """Hosts on one bridge. Use as a context manager: `with Fleet(tmp).create() as fleet: fleet.add_host(…)`."""

    __test__ = False

    def __init__(self, workdir: Path, suffix: str | None = None) -> None:
        super().__init__(workdir, suffix)
        self.switch = f"bt-sw-{self.suffix}"
        self.hosts: dict[str, str] = {}  # name -> namespace
        self.addresses: dict[str, str] = {}  # name -> address

    def create(self) -> "Fleet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            run(["ip", "netns", "add", self.switch], check=True)
            self._namespaces.append(self.switch)
            self.ip(self.switch, "link", "add", "br0", "type", "bridge")
            self.ip(self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def add_host(self, name: str, address: str) -> str:
        """A namespace `bt-NAME-XXXX` with `address`/24 on the bridge; returns the namespace's name."""
        ns = f"bt-{name}-{self.suffix}"
        port = f"v{name[:5]}{self.suffix}"[:15]  # the bridge's end, in the switch
        run(["ip", "netns", "add", ns], check=True)
        self._namespaces.append(ns)
        self.ip(self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.ip(self.switch, "link", "set", port, "master", "br0")
        self.ip(self.switch, "link", "set", port, "up")
        self.ip(ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0")
        for dev in ("lo", "eth0"):
            self.ip(ns, "link", "set", dev, "up")
        self._write_etc(ns, {})
        self.hosts[name], self.addresses[name] = ns, address
        return ns

    def node(self, ns: str) -> NodeView:
        return NodeView(self, ns)

    def partition(self, host: str, peer: str) -> None:
        """Drop every packet between `host` and `peer`, in `host`'s namespace, both ways, without a word: a
        connection in flight hangs until its own timeouts, a new one gets no answer to its SYN."""
        table = _partition_table(peer)
        address = self.addresses[peer]
        rules = (f"add table inet {table}\n"
                 f"add chain inet {table} out {{ type filter hook output priority 0; policy accept; }}\n"
                 f"add chain inet {table} in {{ type filter hook input priority 0; policy accept; }}\n"
                 f"add rule inet {table} out ip daddr {address} drop\n"
                 f"add rule inet {table} in ip saddr {address} drop\n")
        run(self.argv(self.hosts[host], ["nft", "-f", "-"]), input=rules.encode(), check=True)

    def heal(self, host: str, peer: str) -> None:
        """Undo `partition(host, peer)`."""
        run(self.argv(self.hosts[host], ["nft", "delete", "table", "inet", _partition_table(peer)]), check=True)


def _partition_table(peer: str) -> str:
    return "bt_cut_" + "".join(c if c.isalnum() else "_" for c in peer)
