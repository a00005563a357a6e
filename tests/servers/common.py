"""What the test servers share: a threaded HTTP server on 127.0.0.1, a call log, a throttle, a clock.

Every request is logged with the clock's time (a test can hand the servers
and the product the same simulated clock) before the server decides to
throttle it, so the log is what the provider would have counted.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Call:
    at: float
    method: str
    path: str  # the URL path; for XML-RPC the method (and the action of one.vm.action)
    status: int = 0
    query: str = ""


class WallClock:
    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(seconds, 0))


class SimClock:
    """A clock that moves only when someone sleeps (or a server ticks it per request)."""

    def __init__(self, start: float = 1_700_000_000.0, tick: float = 0.0) -> None:
        self.now = start
        self.tick = tick
        self.slept = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += max(seconds, 0)
            self.slept += max(seconds, 0)

    def advance(self) -> None:
        with self._lock:
            self.now += self.tick


class Throttle:
    """Refuse calls beyond ``limit`` in any sliding window of ``window`` seconds (None: never),
    or (``random``) a share of all calls, drawn from a seeded generator."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.window = 300.0
        self._accepted: deque[float] = deque()
        self.refused = 0
        self.share = 0.0
        self._rng = random.Random(0)

    def set(self, limit: int | None, window: float = 300.0) -> None:
        self.limit, self.window = limit, window
        self._accepted.clear()
        self.refused = 0
        self.share = 0.0

    def random(self, share: float, seed: int = 0) -> None:
        """Refuse this share of calls at random (Retry-After: 1 s), whatever the rate."""
        self.set(None)
        self.share, self._rng = share, random.Random(seed)

    def admit(self, now: float) -> float | None:
        """None if admitted, else the seconds until a slot frees (Retry-After)."""
        if self.share and self._rng.random() < self.share:
            self.refused += 1
            return 0.0
        if self.limit is None:
            return None
        while self._accepted and self._accepted[0] <= now - self.window:
            self._accepted.popleft()
        if len(self._accepted) >= self.limit:
            self.refused += 1
            return self._accepted[0] + self.window - now
        self._accepted.append(now)
        return None


class QuickHandler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 without Nagle's delay between headers and body."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args) -> None:  # quiet
        pass


class TestServer:
    """Owns a ThreadingHTTPServer on 127.0.0.1 (ephemeral port), its clock, log and throttle."""

    __test__ = False  # not a pytest class

    def __init__(self, handler_class) -> None:
        self.clock = WallClock()
        self.calls: list[Call] = []
        self.throttle = Throttle()
        self.lock = threading.RLock()
        # a handler class per server: two servers of one kind each answer for themselves
        handler = type(handler_class.__name__, (handler_class,), {"owner": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> TestServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def log_call(self, method: str, path: str, query: str = "", throttled: bool = True) -> tuple[Call, float | None]:
        """Record a request and decide on throttling (unless the call is exempt: ``throttled=False``);
        returns (call, retry_after or None)."""
        with self.lock:
            if hasattr(self.clock, "advance"):
                self.clock.advance()
            now = self.clock.time()
            call = Call(now, method, path, query=query)
            self.calls.append(call)
            return call, self.throttle.admit(now) if throttled else None

    def max_in_window(self, window: float, match=lambda c: True) -> int:
        """The most calls (matching ``match``) the server saw in any window of ``window`` seconds."""
        return max_in_window([c.at for c in self.calls if match(c)], window)


def max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` that fall in any window of ``window`` seconds (sliding over the sorted times)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def pool_token_connection(monkeypatch) -> None:
    """The pilot credential every test config names (the Airflow connection glidein_cms_pool_token)."""
    import json

    from tests.helpers import POOL_TOKEN

    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_CMS_POOL_TOKEN",
                       json.dumps({"conn_type": "generic", "password": POOL_TOKEN}))


def signed_envelope(middleware: str, payload: dict) -> str:
    """A real signed UserData envelope, signed with this test's factory key (the state store's): a grid pilot
    is sent the public half of the key that signed its envelope."""
    from airflow_glidein import state, userdata
    from airflow_glidein.bootstrap import keys

    return userdata.build(middleware, payload, keys.signing_key(state.store()))
