"""Which web addresses a prepare job may fetch: corpus URLs are untrusted input.

By default a URL whose host resolves to anything but a global unicast address is refused:
loopback, private ranges, link-local (which holds cloud metadata at 169.254.169.254),
shared address space (100.64.0.0/10, Alibaba's metadata 100.100.100.200), unique-local IPv6
(fd00:ec2::254), multicast, reserved and unspecified addresses, and IPv4 mapped into any of
those. Every redirect is checked the same way before it is followed. `allow_loopback` lets
127.0.0.0/8 and ::1 through, for the demo mirror and the tests; nothing else can be allowed.

The check resolves the name, then urllib resolves it again to connect: a DNS server that
answers differently the second time (rebinding) is not stopped here; a cluster that must be
safe against that should also block those ranges at its egress.
"""
from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

Resolver = Callable[..., list[tuple[Any, ...]]]
BLOCKED_REASON = "blocked_address"


def system_resolver(host: str, port) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port)


RESOLVE: Resolver = system_resolver  # tests replace this with a stub, never the network


def address_allowed(address: str, allow_loopback: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not ip.is_multicast


def host_allowed(host: str, allow_loopback: bool, resolve: Resolver | None = None) -> bool:
    """True when every address `host` resolves to may be fetched (unresolvable: False)."""
    if not host:
        return False
    try:
        infos = (resolve or RESOLVE)(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(address_allowed(a, allow_loopback) for a in addresses)


def url_allowed(url: str, allow_loopback: bool, resolve: Resolver | None = None) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and host_allowed(parts.hostname or "",
                                                              allow_loopback, resolve)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an address the guard allows."""

    def __init__(self, allow_loopback: bool, resolve: Resolver | None = None):
        super().__init__()
        self.allow_loopback, self.resolve = allow_loopback, resolve

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not url_allowed(newurl, self.allow_loopback, self.resolve):
            raise urllib.error.URLError(f"{BLOCKED_REASON}: redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def install_redirect_guard(allow_loopback: bool) -> None:
    """img2dataset downloads through urllib.request.urlopen, which uses the process-wide
    opener: guard its redirects in this (worker) process."""
    urllib.request.install_opener(urllib.request.build_opener(GuardedRedirectHandler(allow_loopback)))
