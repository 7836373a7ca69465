"""A loopback-only HTTP file server, so the demo corpus goes through the real download path.

It refuses any address outside 127.0.0.0/8 and ::1 before binding. Run in the foreground
with `python -m pipelines.mirror --root demo_out/mirror --port 8000`; `--latency-ms 50 200
--error-503 0.02 --reset 0.02` makes it behave like real image hosts (see ServingProfile).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

DEFAULT_HOST = "127.0.0.1"
# Many concurrent downloader threads connect at once; the socketserver default backlog of 5
# would drop their SYNs and stall each on a one-second retransmit.
REQUEST_QUEUE_SIZE = 128
# serve_forever notices shutdown() only between polls; its 0.5 s default makes every stop slow.
SHUTDOWN_POLL_S = 0.05

Resolver = Callable[..., list[tuple[Any, ...]]]


def check_loopback_host(host: str, resolve: Resolver = socket.getaddrinfo) -> str:
    """The first address `host` resolves to; ValueError unless every address is loopback."""
    if not host:
        raise ValueError("mirror host must be given; an empty host binds every interface")
    try:
        infos = resolve(host, None)
    except socket.gaierror as error:
        raise ValueError(f"mirror host {host!r} does not resolve: {error}") from error
    addresses = [info[4][0] for info in infos]
    outside = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if not addresses or outside:
        raise ValueError(
            f"mirror host {host!r} resolves to {sorted(set(outside)) or 'nothing'}, outside "
            "127.0.0.0/8 and ::1; the mirror only serves on loopback"
        )
    return addresses[0]


# Failure paths for tests of the download stage: `/_status/503/...` answers that status,
# `/_stall/...` accepts the request and answers nothing for STALL_S seconds.
STATUS_PREFIX = "/_status/"
STALL_PREFIX = "/_stall/"
STALL_S = 10.0


@dataclass(frozen=True)
class ServingProfile:
    """How the mirror answers a request, like real image hosts: a latency drawn uniformly in
    `latency_s`, and a share of requests answered 503 or reset (connection closed with a TCP
    RST, no answer). Every draw is a function of (seed, path) alone, so two downloaders given
    the same URLs meet the same latencies and failures, whatever their request order."""

    latency_s: tuple[float, float] = (0.0, 0.0)
    error_503: float = 0.0
    reset: float = 0.0
    seed: int = 0

    def draw(self, path: str) -> tuple[float, str]:
        """(seconds to wait, outcome "ok" | "503" | "reset") for a request of `path`."""
        digest = hashlib.sha256(f"{self.seed}:{path}".encode("utf-8")).digest()
        u_latency, u_outcome = (int.from_bytes(digest[i : i + 8], "big") / 2**64 for i in (0, 8))
        low, high = self.latency_s
        if u_outcome < self.error_503:
            outcome = "503"
        else:
            outcome = "reset" if u_outcome < self.error_503 + self.reset else "ok"
        return low + (high - low) * u_latency, outcome


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files under its directory without one log line per request; counts requests,
    answers each as the server's ServingProfile says, and simulates HTTP errors and stalled
    servers on the paths above."""

    def do_GET(self) -> None:
        self.server.note_request(+1)
        try:
            self.answer()
        finally:
            self.server.note_request(-1)

    def answer(self) -> None:
        latency, outcome = self.server.profile.draw(self.path)
        if latency:
            time.sleep(latency)
        if outcome == "503":
            self.send_error(503)
            return
        if outcome == "reset":
            self.reset_connection()
            return
        if self.path.startswith(STATUS_PREFIX):
            self.send_error(int(self.path[len(STATUS_PREFIX) :].split("/", 1)[0]))
            return
        if self.path.startswith(STALL_PREFIX):
            time.sleep(STALL_S)
            return
        super().do_GET()

    def reset_connection(self) -> None:
        """Close with RST (linger 0) and no answer, as an overloaded host does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def build_server(
    address: str, port: int, root: Path, profile: ServingProfile = ServingProfile()
) -> ThreadingHTTPServer:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    server_class = type(
        "LoopbackServer",
        (ThreadingHTTPServer,),
        {"address_family": family, "request_queue_size": REQUEST_QUEUE_SIZE, "daemon_threads": True},
    )
    handler = functools.partial(QuietHandler, directory=str(root))
    server = server_class((address, port), handler)
    server.requests_served = 0
    server.count_lock = threading.Lock()
    server.profile = profile
    server.first_request_s = server.last_request_s = None
    server.events = []  # (time.monotonic(), +1 arrival | -1 answered), for in-flight figures
    server.note_request = functools.partial(_note_request, server)
    return server


def _note_request(server: ThreadingHTTPServer, change: int) -> None:
    with server.count_lock:
        now = time.monotonic()
        server.events.append((now, change))
        if change < 0:
            return
        server.requests_served += 1
        if server.first_request_s is None:
            server.first_request_s = now
        server.last_request_s = now


def mean_in_flight(events: list[tuple[float, int]], start: float, end: float) -> float:
    """Time-averaged number of requests being answered between `start` and `end`."""
    level = 0
    area = 0.0
    last = start
    for when, change in sorted(events):
        if when > end:
            break
        if when > start:
            area += level * (when - last)
            last = when
        level += change
    area += level * max(end - last, 0.0)
    return area / max(end - start, 1e-9)


class LoopbackMirror:
    """Serves `root` over HTTP on a loopback address from a daemon thread; a context manager."""

    def __init__(
        self,
        root: str | Path,
        host: str = DEFAULT_HOST,
        port: int = 0,
        delay_s: float = 0.0,
        profile: ServingProfile | None = None,
    ) -> None:
        """`delay_s`: a fixed latency per request; `profile` (wins) for varied ones."""
        self.root = Path(root)
        self.address = check_loopback_host(host)
        self.port = port
        self.profile = profile or ServingProfile(latency_s=(delay_s, delay_s))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the mirror is not running")
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self._server.server_address[1]}"

    @property
    def requests_served(self) -> int:
        return self._server.requests_served if self._server is not None else 0

    @property
    def first_request_s(self) -> float | None:
        """time.monotonic() of the first request served, None before it."""
        return self._server.first_request_s if self._server is not None else None

    @property
    def last_request_s(self) -> float | None:
        """time.monotonic() of the latest request's arrival, None before the first."""
        return self._server.last_request_s if self._server is not None else None

    @property
    def request_events(self) -> list[tuple[float, int]]:
        """(time.monotonic(), +1 arrival or -1 answered) of every request so far."""
        if self._server is None:
            return []
        with self._server.count_lock:
            return list(self._server.events)

    def start(self) -> LoopbackMirror:
        if not self.root.is_dir():
            raise FileNotFoundError(f"mirror root {self.root} is not a directory")
        self._server = build_server(self.address, self.port, self.root, self.profile)
        serve = functools.partial(self._server.serve_forever, poll_interval=SHUTDOWN_POLL_S)
        self._thread = threading.Thread(target=serve, name="loopback-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> LoopbackMirror:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--latency-ms",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("LOW", "HIGH"),
        help="per-request latency, uniform in [LOW, HIGH]",
    )
    parser.add_argument("--error-503", type=float, default=0.0, help="share of requests answered 503")
    parser.add_argument("--reset", type=float, default=0.0, help="share of connections reset")
    args = parser.parse_args(argv)
    profile = ServingProfile(
        latency_s=(args.latency_ms[0] / 1e3, args.latency_ms[1] / 1e3), error_503=args.error_503, reset=args.reset
    )
    with LoopbackMirror(args.root, host=args.host, port=args.port, profile=profile) as mirror:
        print(mirror.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
