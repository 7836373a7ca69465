"""The address guard for untrusted corpus URLs. Only loopback is ever contacted: other ranges
go through a stubbed resolver, and their URLs use the reserved `.invalid` domain, so even a
broken guard could not reach them."""
from __future__ import annotations

import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines import url_guard
from pipelines.stages import DownloadParams, ImageFetcher

BLOCKED = ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.100.100.200",
           "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "fd00:ec2::254", "fe80::1",
           "::", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "fc00::1"]
GLOBAL = ["93.184.216.34", "8.8.8.8", "2606:4700::1111"]


def stub(*addresses: str):
    def resolve(host, port):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, 0)) for a in addresses]
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


def test_fetcher_refuses_metadata_address_before_connecting(monkeypatch):
    monkeypatch.setattr(url_guard, "RESOLVE", stub("169.254.169.254"))
    fetch = ImageFetcher(DownloadParams(retries=0, timeout_s=1.0))
    assert fetch("k", "http://metadata.invalid/latest/meta-data/") == (None, "blocked_address")


class RedirectToMetadata(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", "http://metadata.invalid/latest/meta-data/")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_redirects_to_blocked_addresses_are_not_followed(monkeypatch):
    """A loopback server (allowed) redirects to a name the stub resolves to the metadata
    address: the redirect is refused, so nothing but loopback is contacted."""
    real = url_guard.system_resolver
    monkeypatch.setattr(url_guard, "RESOLVE", lambda host, port: stub("169.254.169.254")(host, port)
                        if host.endswith(".invalid") else real(host, port))
    server = ThreadingHTTPServer(("127.0.0.1", 0), RedirectToMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fetch = ImageFetcher(DownloadParams(retries=0, timeout_s=2.0, allow_loopback=True))
        url = f"http://127.0.0.1:{server.server_address[1]}/img.jpg"
        assert fetch("k", url) == (None, "blocked_address")
    finally:
        server.shutdown()
        server.server_close()
        urllib.request.install_opener(None)
