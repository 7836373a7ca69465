"""The address guard for untrusted corpus URLs. Only loopback is ever contacted: other ranges
go through a stubbed resolver, and their URLs use the reserved `.invalid` domain, so even a
broken guard could not reach them. The tests that open connections also forbid name lookups
and any connection off 127.0.0.0/8 at the socket layer."""

from __future__ import annotations

import io
import ipaddress
import socket
import socketserver
import ssl
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import Image

from pipelines import url_guard
from pipelines.stages import DownloadParams, ImageFetcher

BLOCKED = [
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.100.100.200",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "fd00:ec2::254",
    "fe80::1",
    "::",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "fc00::1",
]
GLOBAL = ["93.184.216.34", "8.8.8.8", "2606:4700::1111"]


def stub(*addresses: str):
    def resolve(host, port):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses]

    return resolve


@pytest.mark.parametrize("address", BLOCKED)
def test_non_global_addresses_are_refused_even_with_loopback_allowed(address):
    assert not url_guard.url_allowed("http://host.invalid/a.jpg", True, stub(address))


@pytest.mark.parametrize("address", GLOBAL)
def test_global_addresses_are_allowed(address):
    assert url_guard.url_allowed("https://host.invalid/a.jpg", False, stub(address))


def test_one_bad_address_among_good_ones_refuses_the_host():
    assert not url_guard.url_allowed("http://host.invalid/", False, stub("8.8.8.8", "10.1.2.3"))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_refused_by_default_and_allowed_on_request(address):
    assert not url_guard.url_allowed("http://host.invalid/", False, stub(address))
    assert url_guard.url_allowed("http://host.invalid/", True, stub(address))


@pytest.mark.parametrize("url", ["ftp://8.8.8.8/a", "file:///etc/passwd", "http:///x", "gopher://h/"])
def test_only_http_urls_with_a_host_pass(url):
    assert not url_guard.url_allowed(url, False, stub("8.8.8.8"))


def test_unresolvable_hosts_are_refused():
    def fail(host, port):
        raise socket.gaierror("no such host")

    assert not url_guard.url_allowed("http://nowhere.invalid/", False, fail)


def test_fetcher_refuses_metadata_address_before_connecting(monkeypatch, loopback_only):
    monkeypatch.setattr(url_guard, "RESOLVE", stub("169.254.169.254"))
    fetch = ImageFetcher(DownloadParams(retries=0, timeout_s=1.0))
    assert fetch("k", "http://metadata.invalid/latest/meta-data/") == (None, "blocked_address")
    assert loopback_only == []


class LoopbackServer(socketserver.ThreadingTCPServer):
    """A loopback HTTP server that records the Host header of each request. Plain TCPServer,
    not http.server.HTTPServer, whose bind does a reverse lookup of its own address."""

    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.hosts: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class RedirectToMetadata(QuietHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", "http://metadata.invalid/latest/meta-data/")
        self.end_headers()


def jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 90)).save(out, format="JPEG")
    return out.getvalue()


class ServeJpeg(QuietHandler):
    def do_GET(self):
        self.server.hosts.append(self.headers["Host"])
        body = jpeg_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def loopback_only(monkeypatch):
    """Forbids name lookups (numeric addresses still parse) and any connection off
    127.0.0.0/8, so a broken guard fails the test instead of reaching the network; restores
    the process-wide opener afterwards. Yields every address a socket tried to connect to."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    connected: list[tuple] = []

    def numeric_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    def loopback_connect(sock, address):
        connected.append(address)  # before refusing: the fetch path swallows exceptions
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"connection off loopback: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", loopback_connect)
    yield connected
    urllib.request.install_opener(None)


def counting_stub(*answers: str):
    """A resolver that gives answers[i] on call i (the last one thereafter), and counts."""
    calls = []

    def resolve(host, port):
        calls.append(host)
        return stub(answers[min(len(calls), len(answers)) - 1])(host, port)

    return resolve, calls


def fetch_from(handler, host: str, path: str):
    """(server, result) of one loopback-allowed fetch of http://host:<port>/path from a
    loopback server running `handler`, stopped afterwards."""
    server = LoopbackServer(handler)
    try:
        fetch = ImageFetcher(DownloadParams(retries=0, timeout_s=2.0, allow_loopback=True))
        return server, fetch("k", f"http://{host}:{server.port}{path}")
    finally:
        server.stop()


def test_redirects_to_blocked_addresses_are_not_followed(monkeypatch, loopback_only):
    """A loopback server (allowed) redirects to a name the stub resolves to the metadata
    address: the redirect is refused, so nothing but loopback is contacted."""
    monkeypatch.setattr(
        url_guard,
        "RESOLVE",
        lambda host, port: stub("169.254.169.254")(host, port) if host.endswith(".invalid") else stub(host)(host, port),
    )
    server, result = fetch_from(RedirectToMetadata, "127.0.0.1", "/img.jpg")
    assert result == (None, "blocked_address")
    assert loopback_only == [("127.0.0.1", server.port)]


def test_rebinding_after_the_check_is_refused_at_connect(monkeypatch, loopback_only):
    """The up-front check sees 127.0.0.1, then the name rebinds to 10.0.0.1: the connection
    resolves once itself, validates that answer and refuses it, so no socket is opened."""
    resolve, calls = counting_stub("127.0.0.1", "10.0.0.1")
    monkeypatch.setattr(url_guard, "RESOLVE", resolve)
    server, result = fetch_from(ServeJpeg, "rebind.invalid", "/a.jpg")
    assert result == (None, "blocked_address")
    assert len(calls) == 2 and loopback_only == [] and server.hosts == []


def test_pinned_connection_keeps_the_original_host_header(monkeypatch, loopback_only):
    resolve, calls = counting_stub("127.0.0.1")
    monkeypatch.setattr(url_guard, "RESOLVE", resolve)
    server = LoopbackServer(ServeJpeg)
    try:
        fetch = ImageFetcher(DownloadParams(retries=0, timeout_s=2.0, allow_loopback=True))
        ImageFetcher(DownloadParams(retries=0))  # a strict fetcher beside it changes nothing
        image, reason = fetch("k", f"http://rebind.invalid:{server.port}/a.jpg")
    finally:
        server.stop()
    assert reason == "" and Image.open(io.BytesIO(image["jpg"])).format == "JPEG"
    assert (image["original_width"], image["original_height"]) == (64, 48)
    assert server.hosts == [f"rebind.invalid:{server.port}"]
    assert loopback_only == [("127.0.0.1", server.port)] and len(calls) == 2


class RecordingContext:
    """Stands in for an SSL context: records the server name it is asked to wrap for."""

    verify_mode, check_hostname = ssl.CERT_REQUIRED, True

    def __init__(self):
        self.server_hostnames: list[str] = []

    def wrap_socket(self, sock, server_hostname=None):
        self.server_hostnames.append(server_hostname)
        return sock


def test_https_connection_is_pinned_but_names_the_original_host(monkeypatch, loopback_only):
    """TLS server name and certificate check use the URL's host, the socket the checked IP."""
    monkeypatch.setattr(url_guard, "RESOLVE", stub("127.0.0.1"))
    listener = socket.create_server(("127.0.0.1", 0))
    context, port = RecordingContext(), listener.getsockname()[1]
    conn = url_guard.GuardedHTTPSConnection(f"secure.invalid:{port}", timeout=2.0, context=context, allow_loopback=True)
    try:
        conn.connect()
        assert conn.sock.getpeername() == ("127.0.0.1", port)
    finally:
        conn.close()
        listener.close()
    assert context.server_hostnames == ["secure.invalid"]
    assert loopback_only == [("127.0.0.1", port)]


def test_guarded_connection_refuses_a_blocked_answer(monkeypatch, loopback_only):
    monkeypatch.setattr(url_guard, "RESOLVE", stub("127.0.0.1", "169.254.169.254"))
    conn = url_guard.GuardedHTTPConnection("mixed.invalid", 80, timeout=1.0, allow_loopback=True)
    with pytest.raises(url_guard.BlockedAddressError, match=url_guard.BLOCKED_REASON):
        conn.connect()
    assert loopback_only == []


def test_corpus_fetches_ignore_environment_proxies(monkeypatch, loopback_only):
    """A proxy would resolve the name itself, out of the guard's reach; requests outside a
    corpus fetch keep urllib's own proxy handling."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setattr(url_guard, "RESOLVE", stub("127.0.0.1"))
    opener, server = url_guard.build_guarded_opener(), LoopbackServer(ServeJpeg)
    url = f"http://direct.invalid:{server.port}/a.jpg"
    try:
        with url_guard.guarded_fetch(True), opener.open(url, timeout=2.0) as response:
            assert response.read() == jpeg_bytes()
        with pytest.raises(urllib.error.URLError, match="Name or service"):
            opener.open(url, timeout=2.0)  # via proxy.invalid, which nothing resolves here
    finally:
        server.stop()
    assert server.hosts == [f"direct.invalid:{server.port}"]
