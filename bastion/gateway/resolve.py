"""Name resolution for targets, one way for the server and `bastion policy check`: every address a name has,
canonical, in the resolver's order, so the policy checks each of them and the relay connects to a checked one."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from ..policy.netguard import IPAddress, canonical_address


async def resolve(host: str, port: int, timeout: float) -> tuple[IPAddress, ...]:
    """Every address the name resolves to, canonical and in resolver order; () when it does not resolve."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, asyncio.TimeoutError):
        return ()
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = canonical_address(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
            if address not in addresses:
                addresses.append(address)
    return tuple(addresses)
