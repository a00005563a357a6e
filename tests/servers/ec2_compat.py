"""An EC2-compatible endpoint for tests: moto's EC2 server behind a small HTTP proxy.

moto answers the EC2 Query API strongly consistently and ignores ClientToken.
Real endpoints do neither, so the proxy forwards each request to moto and, by
switch, answers the way they do (XML rewritten with the stdlib):

  lag             instances made less than ``lag`` s ago (by the proxy's clock) are missing from
                  DescribeInstances, filtered or not; naming one by id (DescribeInstances,
                  TerminateInstances, CreateTags) answers InvalidInstanceID.NotFound, as AWS does
                  while a new id propagates
  tag_lag         a tag younger than this is missing from DescribeInstances, and an instance with
                  one is missing from a listing filtered by tag
  client_token    "aws": the same token with the same parameters returns the first call's
                  instances and makes none, other parameters answer IdempotentParameterMismatch,
                  DescribeInstances echoes the token (clientToken);
                  "eucalyptus": a known token returns that token's instances, parameters unchecked;
                  "ignore": the token is dropped (every call makes instances) and never echoed
  tags            "keep"; "refuse_on_create": RunInstances with TagSpecifications fails as a
                  Eucalyptus that predates them answers (HTTP 400, "Failed to bind the following
                  fields"), CreateTags works; "drop": tags are accepted everywhere and kept nowhere
  ignore_filters  DescribeInstances' Filters are ignored: every instance, terminated ones too
  max_per_call    at most N instances per RunInstances, as Eucalyptus places them: MaxCount is cut
                  to N, and MinCount above N fails with InsufficientInstanceCapacity (HTTP 503,
                  "Not enough resources (N in ZONE < MIN): vm instances."); without it a call
                  makes MaxCount instances, as a cloud with room does (moto alone makes MinCount)
  terminate_noop  this share of the instances a TerminateInstances names (seeded draw per
                  instance and call) are answered shutting-down and left running
  throttle        this share of all calls (seeded), or past ``throttle_limit`` calls in any
                  ``throttle_window`` s, answer RequestLimitExceeded (HTTP 503), as EC2 does

Switches change at runtime: ``proxy.set(lag=30, client_token="eucalyptus")``, or from
another process ``POST /ec2-compat/switches`` with a JSON object of the same names
(``GET`` reads them, ``POST /ec2-compat/reset`` resets). ``reset()`` resets moto, the
switches (AWS semantics, no lag) and what the proxy remembers. ``clock`` is any
object with ``time()`` (tests hand it the simulated clock) or a plain callable.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import re
import threading
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, fields
from urllib.parse import parse_qsl, urlencode, urlparse
from xml.sax.saxutils import escape

from tests.servers.common import QuickHandler, TestServer, WallClock

ADMIN = "/ec2-compat"
CLIENT_TOKEN_MODES = ("aws", "eucalyptus", "ignore")
TAG_MODES = ("keep", "refuse_on_create", "drop")


@dataclass
class Switches:
    lag: float = 0.0
    tag_lag: float = 0.0
    client_token: str = "aws"
    tags: str = "keep"
    ignore_filters: bool = False
    max_per_call: int | None = None
    terminate_noop: float = 0.0
    throttle: float = 0.0
    throttle_limit: int | None = None
    throttle_window: float = 300.0
    seed: int = 0

    def check(self) -> None:
        if self.client_token not in CLIENT_TOKEN_MODES:
            raise ValueError(f"client_token must be one of {CLIENT_TOKEN_MODES}")
        if self.tags not in TAG_MODES:
            raise ValueError(f"tags must be one of {TAG_MODES}")
        if self.lag < 0 or self.tag_lag < 0:
            raise ValueError("lag and tag_lag are seconds >= 0")
        if not (0 <= self.terminate_noop <= 1 and 0 <= self.throttle <= 1):
            raise ValueError("terminate_noop and throttle are shares in [0, 1]")
        if self.max_per_call is not None and self.max_per_call < 1:
            raise ValueError("max_per_call is at least 1 (or None)")


class _FnClock:
    def __init__(self, fn) -> None:
        self.time = fn


class EC2CompatProxy(TestServer):
    """moto (a ``tests.helpers.MotoEC2``) behind a proxy on 127.0.0.1 that answers like real EC2 endpoints."""

    def __init__(self, moto) -> None:
        super().__init__(_Handler)
        self.moto = moto
        self.url = self.base
        self._moto_addr = urlparse(moto.url).netloc
        self.switches = Switches()
        self._born: dict[str, float] = {}  # instance id -> when the proxy saw it made
        self._tag_born: dict[tuple[str, str], float] = {}  # (instance id, tag key) -> when it was set
        self._tokens: dict[str, tuple[str, list[str]]] = {}  # ClientToken -> (parameters digest, instance ids)
        self._rng = random.Random(0)
        self._run_lock = threading.Lock()  # one RunInstances at a time: a token is checked and recorded at once

    @property
    def clock(self):
        return self._clock

    @clock.setter
    def clock(self, value) -> None:
        self._clock = value if hasattr(value, "time") else _FnClock(value)

    # -- test controls ------------------------------------------------------------------
    def set(self, **changes) -> Switches:
        unknown = set(changes) - {f.name for f in fields(Switches)}
        if unknown:
            raise ValueError(f"unknown switch(es) {sorted(unknown)}")
        with self.lock:
            new = Switches(**{**asdict(self.switches), **changes})
            new.check()
            self.switches = new
            touched = set(changes) or {"seed"}  # set() with nothing: start every draw and window afresh
            if touched & {"terminate_noop", "seed"}:
                self._rng = random.Random(new.seed)
            if touched & {"throttle", "throttle_limit", "throttle_window", "seed"}:
                if new.throttle:
                    self.throttle.random(new.throttle, seed=new.seed)
                else:
                    self.throttle.set(new.throttle_limit, new.throttle_window)
            return new

    def reset(self) -> None:
        self.moto.reset()
        with self.lock:
            self.calls.clear()
            self._born.clear()
            self._tag_born.clear()
            self._tokens.clear()
            self.switches = Switches()
            self.set()
            self.clock = WallClock()

    def connection_json(self, region: str = "us-east-1") -> str:
        return json.dumps({"conn_type": "aws", "login": "testing-access-key", "password": "testing-secret-key",
                           "extra": {"endpoint_url": self.url, "region_name": region}})

    def client(self, region: str = "us-east-1", **config):
        """A boto3 EC2 client through the proxy (what the product sees); ``config``: botocore Config."""
        import boto3
        from botocore.config import Config

        return boto3.client("ec2", region_name=region, endpoint_url=self.url, aws_access_key_id="x",
                            aws_secret_access_key="y", config=Config(**config) if config else None)

    def instances(self, region: str = "us-east-1", live_only: bool = True) -> list[dict]:
        """What moto really holds (no lag, no quirk), as ``MotoEC2.instances``."""
        return self.moto.instances(region, live_only)

    def age(self, instance_ids, seconds: float, region: str = "us-east-1") -> None:
        self.moto.age(instance_ids, seconds, region)

    # -- the proxy --------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock.time()

    def handle(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        action = params.get("Action", "")
        call, retry_after = self.log_call("POST", action)
        if retry_after is not None:
            status, body = _error(503, "RequestLimitExceeded", "Request limit exceeded.")
        else:
            act = {"RunInstances": self._run, "DescribeInstances": self._describe,
                   "TerminateInstances": self._terminate, "CreateTags": self._tag, "DeleteTags": self._tag}
            status, body = act.get(action, self._forward)(params, headers)
        call.status = status
        return status, body

    def _forward(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self._moto_addr, timeout=120)
        try:
            keep = {k: v for k, v in headers.items()
                    if k.lower() in ("authorization", "x-amz-date", "x-amz-security-token", "user-agent")}
            keep["Content-Type"] = "application/x-www-form-urlencoded; charset=utf-8"
            conn.request("POST", "/", urlencode(params).encode(), keep)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _young(self, ids: list[str], now: float) -> list[str]:
        lag = self.switches.lag
        return [i for i in ids if lag and now - self._born.get(i, -1e18) < lag]

    def _describe(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        sw, now = self.switches, self.now()
        young = self._young(_indexed(params, "InstanceId"), now)
        if young:
            return _not_found(young)
        if sw.ignore_filters:
            params = {k: v for k, v in params.items() if not k.startswith("Filter.")}
        status, body = self._forward(params, headers)
        if status != 200 or not (sw.lag or sw.tag_lag or sw.client_token == "ignore"):
            return status, body
        by_tag = any(v.startswith("tag") for k, v in params.items() if re.fullmatch(r"Filter\.\d+\.Name", k))
        root = ET.fromstring(body)
        q = _qualifier(root)
        with self.lock:
            for rset in root.iter(q("reservationSet")):
                for res in list(rset):
                    iset = res.find(q("instancesSet"))
                    for inst in list(iset):
                        iid = inst.findtext(q("instanceId"))
                        if self._young([iid], now) or (self._hide_young_tags(inst, iid, now, q) and by_tag):
                            iset.remove(inst)
                        elif sw.client_token == "ignore":
                            _drop(inst, q("clientToken"))
                    if not len(iset):
                        rset.remove(res)
        return status, _xml(root)

    def _hide_young_tags(self, inst: ET.Element, iid: str, now: float, q) -> bool:
        """Take tags younger than ``tag_lag`` off an instance item; True if there were any."""
        tag_set, hidden = inst.find(q("tagSet")), False
        for item in list(tag_set) if tag_set is not None else []:
            born = self._tag_born.get((iid, item.findtext(q("key"))))
            if born is not None and now - born < self.switches.tag_lag:
                tag_set.remove(item)
                hidden = True
        return hidden

    def _run(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        sw = self.switches
        token = params.get("ClientToken", "")
        digest = _digest(params)
        with self._run_lock:
            if sw.client_token == "ignore":
                params = {k: v for k, v in params.items() if k != "ClientToken"}
            elif token in self._tokens:
                first, ids = self._tokens[token]
                if sw.client_token == "aws" and first != digest:
                    return _error(400, "IdempotentParameterMismatch",
                                  "The request uses the same client token as a previous, but non-identical request.")
                return self._replay(ids, headers)
            tagged = sorted(k for k in params if k.startswith("TagSpecification."))
            if tagged and sw.tags == "refuse_on_create":
                fields_ = "".join(f"{k} = {params[k]}\n" for k in tagged)
                return _error(400, "400 Bad Request", "Failed to bind the following fields:\n" + fields_)
            if sw.tags == "drop":
                params = {k: v for k, v in params.items() if k not in tagged}
            low, high = int(params.get("MinCount", 1)), int(params.get("MaxCount", 1))
            room = high if sw.max_per_call is None else sw.max_per_call
            if low > room and sw.max_per_call is not None:
                zone = params.get("Placement.AvailabilityZone", "default")
                return _error(503, "InsufficientInstanceCapacity",
                              f"Not enough resources ({room} in {zone} < {low}): vm instances.")
            if low <= high:  # moto makes MinCount instances; a cloud with room makes MaxCount (or what fits)
                params = {**params, "MinCount": str(min(high, room)), "MaxCount": str(min(high, room))}
            status, body = self._forward(params, headers)
            if status != 200:
                return status, body
            root = ET.fromstring(body)
            q = _qualifier(root)
            ids = [e.text for e in root.iter(q("instanceId"))]
            now = self.now()
            with self.lock:
                self._born.update(dict.fromkeys(ids, now))
                for key in _instance_tag_keys(params):
                    self._tag_born.update({(i, key): now for i in ids})
                if sw.client_token != "ignore" and token:
                    self._tokens[token] = (digest, ids)
            if sw.client_token == "ignore":
                for inst in root.iter(q("item")):
                    _drop(inst, q("clientToken"))
                return status, _xml(root)
            return status, body

    def _replay(self, ids: list[str], headers: dict[str, str]) -> tuple[int, bytes]:
        """The first call's reservation as RunInstances answers it, its instances as they are now."""
        params = {"Action": "DescribeInstances", "Version": "2016-11-15",
                  **{f"InstanceId.{n}": i for n, i in enumerate(ids, 1)}}
        status, body = self._forward(params, headers)
        if status != 200:
            return status, body
        found = ET.fromstring(body)
        q = _qualifier(found)
        out = ET.Element(q("RunInstancesResponse"))
        ET.SubElement(out, q("requestId")).text = str(uuid.uuid4())
        reservations = found.findall(f"{q('reservationSet')}/{q('item')}")
        for child in reservations[0] if reservations else []:
            out.append(child)
        return 200, _xml(out)

    def _terminate(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        ids = _indexed(params, "InstanceId")
        young = self._young(ids, self.now())
        if young:
            return _not_found(young)
        with self.lock:
            share = self.switches.terminate_noop
            noop = [i for i in ids if share and self._rng.random() < share]
        if not noop:
            return self._forward(params, headers)
        act = [i for i in ids if i not in noop]
        if act:
            rest = {k: v for k, v in params.items() if not k.startswith("InstanceId.")}
            status, body = self._forward({**rest, **{f"InstanceId.{n}": i for n, i in enumerate(act, 1)}}, headers)
            if status != 200:
                return status, body
            root = ET.fromstring(body)
        else:
            root = ET.fromstring('<TerminateInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
                                 f"<requestId>{uuid.uuid4()}</requestId><instancesSet/></TerminateInstancesResponse>")
        q = _qualifier(root)
        iset = root.find(q("instancesSet"))
        for iid in noop:  # said to be shutting down; nothing happens
            item = ET.SubElement(iset, q("item"))
            ET.SubElement(item, q("instanceId")).text = iid
            for tag, code, name in (("currentState", "32", "shutting-down"), ("previousState", "16", "running")):
                state = ET.SubElement(item, q(tag))
                ET.SubElement(state, q("code")).text = code
                ET.SubElement(state, q("name")).text = name
        return 200, _xml(root)

    def _tag(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        ids = _indexed(params, "ResourceId")
        young = self._young([i for i in ids if i.startswith("i-")], self.now())
        if young:
            return _not_found(young)
        if self.switches.tags == "drop":
            name = params["Action"]
            return 200, (f'<{name}Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>'
                         f"{uuid.uuid4()}</requestId><return>true</return></{name}Response>").encode()
        status, body = self._forward(params, headers)
        if status == 200 and params["Action"] == "CreateTags":
            now = self.now()
            keys = [v for k, v in params.items() if re.fullmatch(r"Tag\.\d+\.Key", k)]
            with self.lock:
                self._tag_born.update({(i, key): now for i in ids for key in keys})
        return status, body

    # -- admin -------------------------------------------------------------------------------
    def admin(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            if path == f"{ADMIN}/reset" and method == "POST":
                self.reset()
            elif path == f"{ADMIN}/switches" and method == "POST":
                self.set(**json.loads(body or b"{}"))
            elif not (path == f"{ADMIN}/switches" and method == "GET"):
                return 404, json.dumps({"error": f"no admin route {method} {path}"}).encode()
        except (ValueError, TypeError) as exc:
            return 400, json.dumps({"error": str(exc)}).encode()
        return 200, json.dumps(asdict(self.switches)).encode()


def _indexed(params: dict[str, str], name: str) -> list[str]:
    """The values of a Query API list (``InstanceId.1``, ``InstanceId.2``, ...), in order."""
    found = [(int(k.rsplit(".", 1)[1]), v) for k, v in params.items() if re.fullmatch(rf"{name}\.\d+", k)]
    return [v for _, v in sorted(found)]


def _instance_tag_keys(params: dict[str, str]) -> list[str]:
    """The tag keys RunInstances' TagSpecifications put on the instances."""
    specs = {k.split(".")[1] for k, v in params.items()
             if re.fullmatch(r"TagSpecification\.\d+\.ResourceType", k) and v == "instance"}
    return [v for k, v in params.items()
            if re.fullmatch(r"TagSpecification\.(\d+)\.Tag\.\d+\.Key", k) and k.split(".")[1] in specs]


def _digest(params: dict[str, str]) -> str:
    """What makes two RunInstances "the same request" for AWS: every parameter but the token."""
    same = sorted((k, v) for k, v in params.items() if k not in ("ClientToken", "DryRun"))
    return hashlib.sha256(json.dumps(same).encode()).hexdigest()


def _qualifier(root: ET.Element):
    ns = root.tag[1:].split("}")[0] if root.tag.startswith("{") else ""
    return (lambda tag: f"{{{ns}}}{tag}") if ns else (lambda tag: tag)


def _xml(root: ET.Element) -> bytes:
    ns = root.tag[1:].split("}")[0] if root.tag.startswith("{") else None
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, default_namespace=ns)


def _drop(parent: ET.Element, tag: str) -> None:
    for child in parent.findall(tag):
        parent.remove(child)


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
                    f"<Message>{escape(message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID>"
                    "</Response>").encode()


def _not_found(ids: list[str]) -> tuple[int, bytes]:
    if len(ids) == 1:
        return _error(400, "InvalidInstanceID.NotFound", f"The instance ID '{ids[0]}' does not exist")
    return _error(400, "InvalidInstanceID.NotFound", f"The instance IDs '{', '.join(ids)}' do not exist")


class _Handler(QuickHandler):
    owner: EC2CompatProxy

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path.startswith(ADMIN):
            status, data = self.owner.admin(method, url.path, body)
            return self._send(status, data, "application/json")
        params = dict(parse_qsl(body.decode() if method == "POST" else url.query, keep_blank_values=True))
        status, data = self.owner.handle(params, dict(self.headers))
        self._send(status, data, "text/xml;charset=UTF-8")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")
