"""Which web addresses a prepare job may fetch: corpus URLs are untrusted input.

By default a URL whose host resolves to anything but a global unicast address is refused:
loopback, private ranges, link-local (which holds cloud metadata at 169.254.169.254),
shared address space (100.64.0.0/10, Alibaba's metadata 100.100.100.200), unique-local IPv6
(fd00:ec2::254), multicast, reserved and unspecified addresses, and IPv4 mapped into any of
those. Every redirect is checked the same way before it is followed. `allow_loopback` lets
127.0.0.0/8 and ::1 through, for the demo mirror and the tests; nothing else can be allowed.

The binding check is made where the socket is opened. img2dataset fetches through
urllib.request.urlopen, i.e. the process-wide opener, so `guarded_fetch` installs the guarded
one and marks the requests made inside it as corpus fetches, with their `allow_loopback`
(per fetch, in a context variable: fetchers with different settings can share a process).
Their connections resolve the host once, refuse it unless every address is allowed, and
connect to one of those validated addresses, so a DNS server that answers a public address to
an earlier check and a private one to the connection (rebinding) gains nothing. The Host
header, the TLS server name and the certificate check keep the original host name.
`url_allowed` (the up-front check in `ImageFetcher.fetch_bytes`, and the redirect handler)
gives a fast, clear refusal before any socket, but it is not what stops rebinding.

Corpus fetches ignore environment proxies (`http_proxy`...): through a proxy the socket would
go to the proxy and the proxy would resolve the name itself, out of the guard's reach; a
cluster that must fetch through an egress proxy has to block these ranges at that proxy.
Other urllib requests in the process, outside `guarded_fetch`, are left as urllib makes them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

Resolver = Callable[..., list[tuple[Any, ...]]]
BLOCKED_REASON = "blocked_address"


class BlockedAddressError(OSError):
    """A connection refused by the guard. An OSError, so urllib reports it as a URLError whose
    text (kept by img2dataset) holds BLOCKED_REASON for `stages.classify_download_error`."""


def system_resolver(host: str, port) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


RESOLVE: Resolver = system_resolver  # tests replace this with a stub, never the network


def address_allowed(address: str, allow_loopback: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not ip.is_multicast


def resolve_allowed(host: str, port, allow_loopback: bool, resolve: Resolver | None = None) -> list[str]:
    """The addresses `host` resolves to, in resolver order, if every one may be fetched.
    Raises BlockedAddressError otherwise: one bad answer condemns the name, since which
    address a client picks is not ours to rely on. Resolver errors propagate."""
    addresses = list(dict.fromkeys(info[4][0] for info in (resolve or RESOLVE)(host, port)))
    if not addresses:
        raise BlockedAddressError(f"{BLOCKED_REASON}: {host} resolves to no address")
    for address in addresses:
        if not address_allowed(address, allow_loopback):
            raise BlockedAddressError(f"{BLOCKED_REASON}: {host} resolves to {address}")
    return addresses


def host_allowed(host: str, allow_loopback: bool, resolve: Resolver | None = None) -> bool:
    """True when every address `host` resolves to may be fetched (unresolvable: False)."""
    if not host:
        return False
    try:
        resolve_allowed(host, None, allow_loopback, resolve)
    except (OSError, UnicodeError):  # BlockedAddressError and socket.gaierror
        return False
    return True


def url_allowed(url: str, allow_loopback: bool, resolve: Resolver | None = None) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and host_allowed(parts.hostname or "", allow_loopback, resolve)


def connect_pinned(host: str, port: int, timeout, source_address, allow_loopback: bool):
    """A socket to `host` that resolves it exactly once, through RESOLVE, and connects to one
    of the validated addresses (each in turn, as socket.create_connection does). Given a
    numeric address, create_connection does no DNS lookup, so nothing can rebind here."""
    error: OSError | None = None
    for address in resolve_allowed(host, port, allow_loopback):
        try:
            return socket.create_connection((address, port), timeout, source_address)
        except OSError as exc:
            error = exc
    raise error


FETCH_ALLOW_LOOPBACK: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "url_guard_fetch_allow_loopback", default=None
)  # None: not inside guarded_fetch


class PinnedConnectionMixin:
    """Swaps http.client's socket factory (`_create_connection`, called with (self.host,
    self.port)) for `connect_pinned`. self.host stays the name, so the Host header, and for
    HTTPS the SNI and certificate hostname (`server_hostname=self.host`), are the original."""

    def __init__(self, host, port=None, *, allow_loopback: bool, **kwargs):
        super().__init__(host, port, **kwargs)
        self.allow_loopback = allow_loopback
        self._create_connection = self.create_pinned_connection

    def create_pinned_connection(self, address, timeout, source_address=None):
        host, port = address
        return connect_pinned(host, port, timeout, source_address, self.allow_loopback)


class GuardedHTTPConnection(PinnedConnectionMixin, http.client.HTTPConnection):
    pass


class GuardedHTTPSConnection(PinnedConnectionMixin, http.client.HTTPSConnection):
    pass


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    """Pins the connections of corpus fetches; other requests get urllib's own."""

    def http_open(self, req):
        allow_loopback = FETCH_ALLOW_LOOPBACK.get()
        if allow_loopback is None:
            return super().http_open(req)
        return self.do_open(GuardedHTTPConnection, req, allow_loopback=allow_loopback)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    """Pins the connections of corpus fetches; other requests get urllib's own."""

    def https_open(self, req):
        allow_loopback = FETCH_ALLOW_LOOPBACK.get()
        if allow_loopback is None:
            return super().https_open(req)
        return self.do_open(
            GuardedHTTPSConnection,
            req,
            context=self._context,
            check_hostname=self._check_hostname,
            allow_loopback=allow_loopback,
        )


class FetchProxyHandler(urllib.request.ProxyHandler):
    """Environment proxies for other requests, none for corpus fetches (a proxy would resolve
    the name itself, beyond the guard)."""

    def proxy_open(self, req, proxy, type):
        if FETCH_ALLOW_LOOPBACK.get() is not None:
            return None  # not handled here: the HTTP(S) handler connects directly, pinned
        return super().proxy_open(req, proxy, type)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a corpus fetch's redirect only to an address the guard allows (a clear early
    refusal; the redirected request's own connection is pinned and checked regardless)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        allow_loopback = FETCH_ALLOW_LOOPBACK.get()
        if allow_loopback is not None and not url_allowed(newurl, allow_loopback):
            raise urllib.error.URLError(f"{BLOCKED_REASON}: redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def build_guarded_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        FetchProxyHandler(), GuardedHTTPHandler(), GuardedHTTPSHandler(), GuardedRedirectHandler()
    )


@functools.cache
def guarded_opener() -> urllib.request.OpenerDirector:
    return build_guarded_opener()  # one per process: it holds no per-fetch state


def install_guarded_opener() -> None:
    urllib.request.install_opener(guarded_opener())


@contextlib.contextmanager
def guarded_fetch(allow_loopback: bool):
    """Makes the urllib requests of this thread (img2dataset's urlopen) corpus fetches until
    the block ends. Installs the guarded opener each time, not once: an opener installed
    since by someone else (or a test's reset) would otherwise let a fetch run unguarded."""
    install_guarded_opener()
    token = FETCH_ALLOW_LOOPBACK.set(allow_loopback)
    try:
        yield
    finally:
        FETCH_ALLOW_LOOPBACK.reset(token)
