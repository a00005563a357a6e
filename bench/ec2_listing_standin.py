"""A cheap stand-in for EC2's DescribeInstances, for the boot-storm benchmark: it lists, counts, and nothing else.

The bootstrap service lists a launch through the real EC2 hook (boto3 and
the entry's API budget); this answers those calls over HTTP on 127.0.0.1,
filtering an in-memory set of instances by tags and state as EC2 does, and
counts the calls per launch (the benchmark's "listings per launch"). moto
would create and render 10,000 instances slower than the service serves
them, so it would time the emulator instead of the service.

Switches, as real clouds misbehave: ``lag`` (s an instance stays out of
listings after it was made: eventual consistency), ``throttle_every`` (every
n-th call answers RequestLimitExceeded).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from airflow_glidein import pilots as P

NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


class EC2Listing:
    def __init__(self, lag: float = 0.0, throttle_every: int = 0) -> None:
        self.instances: dict[str, tuple[float, dict[str, str]]] = {}  # id -> (made, tags)
        self.calls: Counter[str] = Counter()  # launch filter value (or "*") -> DescribeInstances calls
        self.lag, self.throttle_every = lag, throttle_every
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                status, body = outer.answer({k: v[0] for k, v in form.items()})
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> EC2Listing:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, ids: list[str], tags: dict[str, str]) -> None:
        now = time.time()
        with self.lock:
            self.instances.update({i: (now, dict(tags)) for i in ids})

    def answer(self, form: dict[str, str]) -> tuple[int, bytes]:
        if form.get("Action") != "DescribeInstances":
            return 400, self._error("InvalidAction", f"only DescribeInstances here, not {form.get('Action')}")
        filters: dict[str, set[str]] = {}
        n = 1
        while f"Filter.{n}.Name" in form:
            name, m = form[f"Filter.{n}.Name"], 1
            while f"Filter.{n}.Value.{m}" in form:
                filters.setdefault(name, set()).add(form[f"Filter.{n}.Value.{m}"])
                m += 1
            n += 1
        ids = {v for k, v in form.items() if k.startswith("InstanceId.")}
        with self.lock:
            for launch in filters.get(f"tag:{P.TAG_LAUNCH}", {"*"}):
                self.calls[launch] += 1
            if self.throttle_every and sum(self.calls.values()) % self.throttle_every == 0:
                return 503, self._error("RequestLimitExceeded", "Request limit exceeded.")
            seen = time.time() - self.lag
            found = [(i, tags) for i, (made, tags) in self.instances.items() if made <= seen
                     and (not ids or i in ids)
                     and all(tags.get(k[4:]) in v for k, v in filters.items() if k.startswith("tag:"))]
        items = "".join(
            f"<item><instanceId>{escape(i)}</instanceId><instanceState><code>16</code><name>running</name>"
            f"</instanceState><launchTime>2026-01-01T00:00:00.000Z</launchTime><tagSet>"
            + "".join(f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in tags.items())
            + "</tagSet></item>" for i, tags in found)
        body = (f'<?xml version="1.0" encoding="UTF-8"?><DescribeInstancesResponse xmlns="{NS}">'
                f"<requestId>bench</requestId><reservationSet><item><reservationId>r-bench</reservationId>"
                f"<ownerId>123456789012</ownerId><instancesSet>{items}</instancesSet></item></reservationSet>"
                f"</DescribeInstancesResponse>")
        return 200, body.encode()

    @staticmethod
    def _error(code: str, message: str) -> bytes:
        return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error></Errors><RequestID>bench</RequestID></Response>").encode()
