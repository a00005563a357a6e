"""The soak's EC2: moto's server on 127.0.0.1 with a log of every call, and in-process access for the VMs.

Every API call the product makes (factory tasks, the bootstrap service's listings) is logged at the
server with its time, action and region, so the soak checks the API budget where the provider would
count it. The VM simulator reads and terminates instances through moto's backend directly: what a
hypervisor does is not an API call of ours.

The product reaches moto through the EC2-compatible proxy (tests/servers/ec2_compat.py) when the
soak turns it on: listings lag and a share of calls is throttled (RequestLimitExceeded), as on real
EC2; the calls are then counted at the proxy, throttled ones included. The VM simulator keeps
reading moto itself: a hypervisor sees no listing lag.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from urllib.parse import parse_qs

from moto.core import DEFAULT_ACCOUNT_ID
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

_REGION = re.compile(r"Credential=[^/]+/\d+/([a-z0-9-]+)/")


class CallLog:
    """A WSGI middleware: (time, region, action, access key) of every EC2 request."""

    def __init__(self, app) -> None:
        self.app = app
        self.calls: list[tuple[float, str, str]] = []  # what reached moto
        self.proxied: list[tuple[float, str, str]] = []  # what the proxy answered, when there is one
        self.counted = self.calls  # the calls the product made
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size) if size else b""
        environ["wsgi.input"] = io.BytesIO(body)
        action = (parse_qs(body.decode(errors="replace")).get("Action") or ["?"])[0]
        m = _REGION.search(environ.get("HTTP_AUTHORIZATION", ""))
        with self.lock:
            self.calls.append((time.time(), m.group(1) if m else "?", action))
        return self.app(environ, start_response)

    def of(self, region: str | None = None, action: str | None = None) -> list[float]:
        """Times of the product's calls (at the proxy when there is one)."""
        with self.lock:
            return [t for t, r, a in self.counted if (region is None or r == region) and (action is None or a == action)]

    def reached_moto(self, action: str) -> list[float]:
        with self.lock:
            return [t for t, _, a in self.calls if a == action]


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # the call log keeps what matters
        pass


class Cloud(ThreadedMotoServer):
    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.log = CallLog(DomainDispatcherApplication(create_backend_app))
        self.proxy = None

    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, self.log, True, request_handler=_Quiet)
        self._server_ready_event.set()
        self._server.serve_forever()

    def start(self) -> None:
        super().start()
        host, port = self.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def behind_proxy(self, lag: float, throttle: float) -> None:
        """The product's endpoint becomes the EC2-compatible proxy with these switches."""
        from tests.servers.ec2_compat import EC2CompatProxy

        log = self.log

        class CountedProxy(EC2CompatProxy):
            def handle(self, params, headers):
                m = _REGION.search(headers.get("Authorization") or headers.get("authorization") or "")
                with log.lock:
                    log.proxied.append((time.time(), m.group(1) if m else "?", params.get("Action", "?")))
                return super().handle(params, headers)

        self.proxy = CountedProxy(self).start()
        self.proxy.set(lag=lag, throttle=throttle, seed=18)
        log.counted = log.proxied  # the budget is what the product sent, throttled calls included

    @property
    def endpoint_url(self) -> str:
        return self.proxy.url if self.proxy else self.url

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()
        super().stop()

    @staticmethod
    def backend(region: str):
        from moto.ec2.models import ec2_backends

        return ec2_backends[DEFAULT_ACCOUNT_ID][region]

    def instances(self, region: str) -> list:
        """Every instance moto has in the region, terminated ones included (moto keeps them)."""
        for _ in range(10):
            try:
                return list(self.backend(region).all_instances())
            except RuntimeError:  # a dict changed size under us: the server thread was adding
                time.sleep(0.05)
        return list(self.backend(region).all_instances())

    def terminate(self, region: str, instance_id: str) -> None:
        self.backend(region).terminate_instances([instance_id])


def tags(instance) -> dict[str, str]:
    return {t["key"]: t["value"] for t in instance.get_tags()}


def userdata(instance) -> bytes:
    data = instance.user_data
    if isinstance(data, list):
        data = data[0] if data else ""
    data = data or ""
    return base64.b64decode(data if isinstance(data, (bytes, str)) else str(data))
