"""The bastion's own addresses, and the network guard built from them and the config."""

from __future__ import annotations

import ipaddress
import socket

import psutil

from .config import Config
from .netguard import IPAddress, NetGuard, canonical_address


def own_addresses() -> frozenset[IPAddress]:
    """Every address on this host's interfaces: targets the bastion never forwards to unless listed."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(canonical_address(ipaddress.ip_address(entry.address.split("%", 1)[0])))
                except ValueError:
                    continue
    return frozenset(found)


def make_guard(config: Config) -> NetGuard:
    return NetGuard(internal_networks=config.internal_networks, own_addresses=own_addresses())
