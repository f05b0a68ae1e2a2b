"""Pod IPs of one process node, from its podCIDR (``127.1.<index>.0/24``).

The network address, ``.1`` (a gateway, by convention) and the broadcast address are never
handed out. The lowest free address goes first, so an address freed by a deleted pod is reused;
an address is never held by two owners (pods, by UID) at once.
"""

from __future__ import annotations

import ipaddress
import threading


class PoolExhausted(RuntimeError):
    """Every address of the range is taken."""


class IpPool:
    """Thread-safe allocation of one range's addresses to owners."""

    def __init__(self, cidr: str) -> None:
        network = ipaddress.ip_network(cidr)
        hosts = list(network.hosts())
        self.cidr = str(network)
        self._free = [str(ip) for ip in hosts[1:]] if len(hosts) > 1 else [str(ip) for ip in hosts]
        self._order = {ip: i for i, ip in enumerate(self._free)}
        self._owner_of: dict[str, str] = {}
        self._ip_of: dict[str, str] = {}
        self._lock = threading.Lock()

    def allocate(self, owner: str, preferred: str | None = None) -> str:
        """``owner``'s address: the one it already holds, else ``preferred`` if that is free and in
        range (a pod adopted after a restart keeps its IP), else the lowest free one."""
        with self._lock:
            held = self._ip_of.get(owner)
            if held is not None:
                return held
            ip = preferred
            if ip is None or ip not in self._order or ip in self._owner_of:
                ip = next((candidate for candidate in self._free if candidate not in self._owner_of), None)
            if ip is None:
                raise PoolExhausted(f"no free pod IP left in {self.cidr}")
            self._owner_of[ip] = owner
            self._ip_of[owner] = ip
            return ip

    def release(self, owner: str) -> None:
        """Give ``owner``'s address back (no-op when it holds none)."""
        with self._lock:
            ip = self._ip_of.pop(owner, None)
            if ip is not None:
                self._owner_of.pop(ip, None)

    def owner(self, ip: str) -> str | None:
        with self._lock:
            return self._owner_of.get(ip)

    def __contains__(self, ip: object) -> bool:
        return ip in self._order

    def in_use(self) -> dict[str, str]:
        """Address -> owner, for diagnostics."""
        with self._lock:
            return dict(self._owner_of)
