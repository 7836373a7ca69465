"""The loopback mirror serves files, answers 404 for missing ones, and refuses non-loopback hosts.

Only 127.0.0.1 is ever connected to; other ranges are checked with a stubbed resolver.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pytest

from pipelines.mirror import LoopbackMirror, ServingProfile, check_loopback_host, mean_in_flight


def stub_resolver(*addresses: str):
    """A getaddrinfo stand-in answering `addresses` for any host, without any lookup."""

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses]

    return resolve


def test_mirror_serves_file_bytes(tmp_path):
    payload = bytes(range(256)) * 40
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000001.jpg").write_bytes(payload)
    with LoopbackMirror(tmp_path) as mirror:
        assert mirror.base_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{mirror.base_url}/images/000001.jpg", timeout=5) as response:
            assert response.status == 200
            assert response.read() == payload


def test_mirror_answers_404_for_missing_file(tmp_path):
    with LoopbackMirror(tmp_path) as mirror:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{mirror.base_url}/images/missing.jpg", timeout=5)
    assert error.value.code == 404


def test_mirror_stops_and_frees_its_port(tmp_path):
    mirror = LoopbackMirror(tmp_path).start()
    port = int(mirror.base_url.rsplit(":", 1)[1])
    mirror.stop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # would raise if the server socket were still open


@pytest.mark.parametrize("host", ["10.0.0.1", "8.8.8.8", "0.0.0.0", "192.168.1.10"])
def test_guard_rejects_non_loopback_addresses(host):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback_host(host, resolve=stub_resolver(host))


def test_guard_rejects_hostname_resolving_outside_loopback():
    with pytest.raises(ValueError, match="203.0.113.7"):
        check_loopback_host("mirror.example", resolve=stub_resolver("203.0.113.7"))


def test_guard_rejects_hostname_with_any_non_loopback_address():
    with pytest.raises(ValueError):
        check_loopback_host("mixed.example", resolve=stub_resolver("127.0.0.1", "10.1.2.3"))


def test_guard_rejects_empty_host():
    with pytest.raises(ValueError):
        check_loopback_host("", resolve=stub_resolver("127.0.0.1"))


@pytest.mark.parametrize(
    "host,addresses,expected",
    [
        ("127.0.0.1", ["127.0.0.1"], "127.0.0.1"),
        ("127.0.0.2", ["127.0.0.2"], "127.0.0.2"),
        ("localhost", ["::1", "127.0.0.1"], "::1"),
    ],
)
def test_guard_accepts_loopback(host, addresses, expected):
    assert check_loopback_host(host, resolve=stub_resolver(*addresses)) == expected


def test_guard_accepts_loopback_literals_with_real_resolver():
    # Numeric literals resolve locally without any lookup traffic.
    assert check_loopback_host("127.0.0.1") == "127.0.0.1"
    assert check_loopback_host("127.0.0.2") == "127.0.0.2"


def test_mirror_refuses_to_bind_outside_loopback(tmp_path):
    with pytest.raises(ValueError):
        LoopbackMirror(tmp_path, host="10.0.0.1")


def test_serving_profile_draws_depend_on_the_path_alone():
    profile = ServingProfile(latency_s=(0.05, 0.2), error_503=0.1, reset=0.05, seed=7)
    paths = [f"/images/{i:06d}.jpg" for i in range(4000)]
    draws = [profile.draw(p) for p in paths]
    assert draws == [profile.draw(p) for p in reversed(paths)][::-1]  # order does not matter
    assert draws != [ServingProfile(**{**profile.__dict__, "seed": 8}).draw(p) for p in paths]
    latencies = np.array([d[0] for d in draws])
    assert 0.05 <= latencies.min() and latencies.max() <= 0.2 and abs(latencies.mean() - 0.125) < 0.005
    outcomes = Counter(d[1] for d in draws)
    for outcome, share in (("503", 0.1), ("reset", 0.05)):  # binomial: 5 standard errors
        assert abs(outcomes[outcome] / len(paths) - share) < 5 * (share * (1 - share) / len(paths)) ** 0.5


def test_mirror_answers_as_its_profile_draws(tmp_path):
    """A 503 for the paths the profile fails, a connection closed without an answer for the
    ones it resets, the file for the rest."""
    profile = ServingProfile(latency_s=(0.0, 0.01), error_503=0.3, reset=0.3, seed=1)
    names = [f"{i}.bin" for i in range(16)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    seen = Counter()
    with LoopbackMirror(tmp_path, profile=profile) as mirror:
        for name in names:
            outcome = profile.draw(f"/{name}")[1]
            seen[outcome] += 1
            if outcome == "ok":
                with urllib.request.urlopen(f"{mirror.base_url}/{name}", timeout=5) as response:
                    assert response.read() == name.encode()
            elif outcome == "503":
                with pytest.raises(urllib.error.HTTPError) as error:
                    urllib.request.urlopen(f"{mirror.base_url}/{name}", timeout=5)
                assert error.value.code == 503
            else:
                with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, urllib.error.URLError)):
                    urllib.request.urlopen(f"{mirror.base_url}/{name}", timeout=5)
        assert mirror.requests_served == len(names) and mirror.first_request_s is not None
    assert min(seen.values()) > 0 and len(seen) == 3  # the seed gives all three outcomes


def test_mean_in_flight_matches_a_sampled_count():
    """The time-averaged number of open requests, against counting them on a fine time grid."""
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.uniform(0, 10, 200))
    answers = arrivals + rng.uniform(0.05, 0.5, 200)
    events = [(float(t), +1) for t in arrivals] + [(float(t), -1) for t in answers]
    rng.shuffle(events)
    grid = np.linspace(2.0, 8.0, 60_001)[:-1] + 0.5 * 6.0 / 60_000
    sampled = ((arrivals[None, :] <= grid[:, None]) & (answers[None, :] > grid[:, None])).sum(1).mean()
    assert mean_in_flight(events, 2.0, 8.0) == pytest.approx(sampled, rel=1e-3)


def test_mirror_records_each_request_arriving_and_answered(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a")
    with LoopbackMirror(tmp_path, delay_s=0.05) as mirror:
        for _ in range(3):
            with urllib.request.urlopen(f"{mirror.base_url}/a.bin", timeout=5) as response:
                response.read()
        # A handler records its answer after the response is written: the client may read the
        # whole response (and send the next request) before that, so wait for the last record.
        deadline = time.monotonic() + 5
        while len(mirror.request_events) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        events = mirror.request_events
    arrivals = [t for t, change in events if change > 0]
    answers = [t for t, change in events if change < 0]
    assert len(arrivals) == len(answers) == 3 and len(events) == 6
    assert all(b - a >= 0.05 for a, b in zip(arrivals, answers))  # each answer after its delay
    levels = np.cumsum([change for _, change in sorted(events)])
    assert levels.min() >= 0 and levels[-1] == 0
    assert mean_in_flight(events, events[0][0], events[-1][0]) > 0.5  # the waits fill the span
