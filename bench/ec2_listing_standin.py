"""A cheap stand-in for EC2's instance API, for benchmarks: pre-rendered listings, creates, terminations.

The benchmarks reach it through the real EC2 hook (boto3 and the entry's API
budget) over HTTP on 127.0.0.1. It answers DescribeInstances (filtered by
tags, state and ids, paged by MaxResults/NextToken as EC2 pages),
RunInstances and TerminateInstances, and counts the calls per launch (the
boot storm's "listings per launch") and per action. Each instance's XML is
rendered once, when it is made or changes state, so a listing page costs
the server a join of ready bytes: moto renders every instance it lists
(about 1.5 ms of server CPU each), so at 100,000 pilots a benchmark would
time the emulator instead of the factory.

``detail``: each instance also carries the rest of an EC2 instance's
description (bench/ec2_instance_detail.xml: block devices, network
interface, placement, ... as moto renders them for AWS's schema), so the
client parses as much per instance as it would from AWS; without it, only
id, state, launch time and tags.

Switches, as real clouds misbehave: ``lag`` (s an instance stays out of
listings after it was made, by the server's own clock: eventual consistency;
named by id it is InvalidInstanceID.NotFound meanwhile, as on AWS),
``throttle_every`` (every n-th call answers RequestLimitExceeded).

Not EC2: ``Action=BenchSeed`` makes ``Count`` instances with ``Tag.N.Key``/
``Tag.N.Value`` launched ``Age`` s ago and listed at once (a fleet that was
already there); ``GET /bench/stats`` answers JSON: calls per action, live
instances per entry and per launch as the server really holds them (no lag),
and how many are hidden by the lag right now.

    python -m bench.ec2_listing_standin [--port 0] [--lag 30]   (prints its URL, then serves)
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from airflow_glidein import pilots as P

NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
DETAIL = (Path(__file__).parent / "ec2_instance_detail.xml").read_text().strip()
CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48}


class Instance:
    __slots__ = ("id", "made", "launched", "tags", "state", "detail", "xml")

    def __init__(self, iid: str, made: float, launched: float, tags: dict[str, str], state: str,
                 detail: str = "") -> None:
        self.id, self.made, self.launched, self.tags, self.detail = iid, made, launched, tags, detail
        self.set_state(state)

    def set_state(self, state: str) -> None:
        self.state = state
        stamp = datetime.fromtimestamp(self.launched, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self.xml = (
            f"<item><instanceId>{self.id}</instanceId><instanceState><code>{CODES[state]}</code><name>{state}"
            f"</name></instanceState><launchTime>{stamp}</launchTime><tagSet>"
            + "".join(f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in self.tags.items())
            + f"</tagSet>{self.detail}</item>").encode()


class EC2Listing:
    def __init__(self, lag: float = 0.0, throttle_every: int = 0, port: int = 0, detail: bool = False) -> None:
        self.detail = DETAIL if detail else ""
        self.instances: dict[str, Instance] = {}  # in the order made: a NextToken is a position in it
        self.order: list[Instance] = []
        self.by_launch: dict[str, list[Instance]] = {}
        self.calls: Counter[str] = Counter()  # launch filter value (or "*") -> DescribeInstances calls
        self.actions: Counter[str] = Counter()
        self.lag, self.throttle_every = lag, throttle_every
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, json.dumps(outer.stats()).encode(), "application/json")

            def do_POST(self):
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                self._send(*outer.answer({k: v[0] for k, v in form.items()}), "text/xml")

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> EC2Listing:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, ids: list[str], tags: dict[str, str], launched: float | None = None, listed_now: bool = False,
            state: str = "running") -> None:
        now = time.time()
        made = now - self.lag if listed_now else now
        with self.lock:
            for i in ids:
                inst = Instance(i, made, now if launched is None else launched, dict(tags), state, self.detail)
                self.instances[i] = inst
                self.order.append(inst)
                self.by_launch.setdefault(tags.get(P.TAG_LAUNCH, ""), []).append(inst)

    def stats(self) -> dict:
        with self.lock:
            seen = time.time() - self.lag
            live = [i for i in self.order if i.state != "terminated"]
            return {"calls": dict(self.actions), "hidden": sum(i.made > seen for i in live),
                    "live_per_entry": dict(Counter(i.tags.get(P.TAG_ENTRY, "") for i in live)),
                    "live_per_launch": dict(Counter(i.tags.get(P.TAG_LAUNCH, "") for i in live))}

    def answer(self, form: dict[str, str]) -> tuple[int, bytes]:
        action = form.get("Action", "")
        with self.lock:
            self.actions[action] += 1
            if self.throttle_every and sum(self.actions.values()) % self.throttle_every == 0:
                return 503, self._error("RequestLimitExceeded", "Request limit exceeded.")
        if action == "DescribeInstances":
            return self._describe(form)
        if action == "RunInstances":
            return self._run(form)
        if action == "TerminateInstances":
            return self._terminate(form)
        if action == "BenchSeed":
            return self._seed(form)
        return 400, self._error("InvalidAction", f"not answered here: {action}")

    def _describe(self, form: dict[str, str]) -> tuple[int, bytes]:
        filters: dict[str, set[str]] = {}
        n = 1
        while f"Filter.{n}.Name" in form:
            name, m = form[f"Filter.{n}.Name"], 1
            while f"Filter.{n}.Value.{m}" in form:
                filters.setdefault(name, set()).add(form[f"Filter.{n}.Value.{m}"])
                m += 1
            n += 1
        tag_filters = [(k[4:], v) for k, v in filters.items() if k.startswith("tag:")]
        states = filters.get("instance-state-name")
        ids = [v for k, v in form.items() if k.startswith("InstanceId.")]
        limit = int(form.get("MaxResults") or 1_000_000)
        start = int(form.get("NextToken") or 0)
        with self.lock:
            for launch in filters.get(f"tag:{P.TAG_LAUNCH}", {"*"}):
                self.calls[launch] += 1
            seen = time.time() - self.lag
            if ids:
                unknown = [i for i in ids if i not in self.instances or self.instances[i].made > seen]
                if unknown:
                    return 400, self._error("InvalidInstanceID.NotFound",
                                            f"The instance IDs '{', '.join(unknown)}' do not exist")
                pool, start = [self.instances[i] for i in ids], 0
            elif f"tag:{P.TAG_LAUNCH}" in filters:  # a launch's own listing: its index, not the whole region
                pool = [i for v in sorted(filters[f"tag:{P.TAG_LAUNCH}"]) for i in self.by_launch.get(v, [])]
            else:
                pool = self.order
            page: list[bytes] = []
            pos = start
            while pos < len(pool) and len(page) < limit:
                inst = pool[pos]
                pos += 1
                if inst.made <= seen and (states is None or inst.state in states) \
                        and all(inst.tags.get(k) in v for k, v in tag_filters):
                    page.append(inst.xml)
            more = pos < len(pool) and not ids
        token = f"<nextToken>{pos}</nextToken>" if more else ""
        body = (f'<?xml version="1.0" encoding="UTF-8"?><DescribeInstancesResponse xmlns="{NS}">'
                f"<requestId>bench</requestId><reservationSet><item><reservationId>r-bench</reservationId>"
                f"<ownerId>123456789012</ownerId><instancesSet>").encode() + b"".join(page) + (
                f"</instancesSet></item></reservationSet>{token}</DescribeInstancesResponse>").encode()
        return 200, body

    @staticmethod
    def _tags(form: dict[str, str], prefix: str) -> dict[str, str]:
        tags, n = {}, 1
        while f"{prefix}{n}.Key" in form:
            tags[form[f"{prefix}{n}.Key"]] = form.get(f"{prefix}{n}.Value", "")
            n += 1
        return tags

    def _run(self, form: dict[str, str]) -> tuple[int, bytes]:
        count = int(form.get("MaxCount") or 1)
        ids = [f"i-{secrets.token_hex(9)[:17]}" for _ in range(count)]
        self.add(ids, self._tags(form, "TagSpecification.1.Tag."), state="pending")
        with self.lock:
            items = b"".join(self.instances[i].xml for i in ids)
        return 200, (f'<?xml version="1.0" encoding="UTF-8"?><RunInstancesResponse xmlns="{NS}">'
                     f"<requestId>bench</requestId><reservationId>r-{secrets.token_hex(8)}</reservationId>"
                     f"<ownerId>123456789012</ownerId><instancesSet>").encode() + items + \
            b"</instancesSet></RunInstancesResponse>"

    def _terminate(self, form: dict[str, str]) -> tuple[int, bytes]:
        ids = [v for k, v in form.items() if k.startswith("InstanceId.")]
        items = []
        with self.lock:
            for i in ids:
                inst = self.instances.get(i)
                if inst is None:
                    return 400, self._error("InvalidInstanceID.NotFound", f"The instance IDs '{i}' do not exist")
                before = inst.state
                inst.set_state("terminated")
                items.append(f"<item><instanceId>{i}</instanceId><currentState><code>48</code><name>terminated"
                             f"</name></currentState><previousState><code>{CODES[before]}</code><name>{before}"
                             f"</name></previousState></item>")
        return 200, (f'<?xml version="1.0" encoding="UTF-8"?><TerminateInstancesResponse xmlns="{NS}">'
                     f"<requestId>bench</requestId><instancesSet>{''.join(items)}</instancesSet>"
                     f"</TerminateInstancesResponse>").encode()

    def _seed(self, form: dict[str, str]) -> tuple[int, bytes]:
        count = int(form["Count"])
        self.add([f"i-{secrets.token_hex(9)[:17]}" for _ in range(count)], self._tags(form, "Tag."),
                 launched=time.time() - float(form.get("Age") or 0), listed_now=True)
        return 200, b"<BenchSeedResponse/>"

    @staticmethod
    def _error(code: str, message: str) -> bytes:
        return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error></Errors><RequestID>bench</RequestID></Response>").encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lag", type=float, default=0.0)
    ap.add_argument("--lean", action="store_true", help="instances without the rest of EC2's description")
    args = ap.parse_args()
    server = EC2Listing(lag=args.lag, port=args.port, detail=not args.lean)
    print(server.url, flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
