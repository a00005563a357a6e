"""A small Keystone v3 + Nova server on 127.0.0.1 for the real openstacksdk (compute proxy).

It implements what ``conn.compute`` calls: Keystone's token request
(password and application credential) with a catalog, Nova's version
discovery (microversions), servers create (with min_count/max_count),
list (``/servers`` and ``/servers/detail`` with name regex, status, tags,
tags-any, reservation_id filters and limit/marker paging with
``servers_links``), get, delete and the forceDelete action, and flavors.
It follows Nova's rules where the hook depends on them: tags at create need
microversion 2.52, tag filters 2.26; networks are required from 2.37;
forceDelete only acts on a soft-deleted server (409 otherwise); with
deferred delete on, DELETE leaves the server SOFT_DELETED (still holding
quota); a page is full at ``max_limit`` and then carries a next link.

Switches for the quirks the seed reports:
  lose_create_responses  the next N creates make their servers, then drop the connection
  stuck(ids, deletes)    these servers ignore that many DELETEs (task_state deleting; inf = forever)
  soft_delete            deferred delete (reclaim_instance_interval > 0)
  error_next             the next N servers made end in ERROR (No valid host)
  throttle.set(n, w)     429 with Retry-After beyond n calls in any w seconds
  lag                    servers made less than ``lag`` s ago (by ``clock``) are missing from
                         /servers and /servers/detail, and GET of one answers 404, as an API
                         whose listing lags its writes does
  ids_from(seed)         server ids from a seeded UUID sequence: two servers given the same seed
                         hand out the same ids (None: random uuid4, Nova's)
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlencode, urlparse

from tests.servers.common import QuickHandler, TestServer

MAX_MICROVERSION = "2.96"


def _mv(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class NovaServer(TestServer):
    """Keystone under /identity/v3, Nova under /compute/v2.1."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.project_id = uuid.uuid4().hex
        self.user_id = uuid.uuid4().hex
        self.users = {("glidein", "Default"): "user-secret"}  # (name, domain) -> password
        self.app_credentials = {"app-cred-id": "app-cred-secret"}
        self.tokens: set[str] = set()
        self.flavors = {"f-4c8g": {"id": "f-4c8g", "name": "m1.pilot", "vcpus": 4, "ram": 8192, "disk": 20}}
        self.images = {"img-glidein"}
        self.networks = {"net-private"}
        self.servers: dict[str, dict] = {}  # id -> server record (deleted ones are removed)
        self.max_microversion = MAX_MICROVERSION
        self.max_limit = 1000
        self.quota_instances = 100000
        self.quota_cores = -1  # -1: unlimited, as Nova says
        self.build_seconds = 0.0  # BUILD until this much clock time has passed
        self.lose_create_responses = 0
        self.soft_delete = False
        self.error_next = 0
        self.lag = 0.0
        self._ids: random.Random | None = None
        self._stuck: dict[str, float] = {}

    # -- test controls ------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            self.servers.clear()
            self.calls.clear()
            self._stuck.clear()
            self.throttle.set(None)
            self.max_microversion = MAX_MICROVERSION
            self.max_limit = 1000
            self.quota_instances = 100000
            self.quota_cores = -1
            self.build_seconds = 0.0
            self.lose_create_responses = 0
            self.soft_delete = False
            self.error_next = 0
            self.lag = 0.0
            self._ids = None

    def ids_from(self, seed: int | None) -> None:
        with self.lock:
            self._ids = None if seed is None else random.Random(seed)

    def _new_id(self) -> str:
        if self._ids is None:
            return str(uuid.uuid4())
        return str(uuid.UUID(int=self._ids.getrandbits(128), version=4))

    def listed(self, s: dict) -> bool:
        """False while the API's listing has not caught up with this server (``lag``)."""
        return self.clock.time() - s["created"] >= self.lag

    def stuck(self, ids, deletes: float = math.inf) -> None:
        with self.lock:
            for sid in ids:
                self._stuck[sid] = deletes

    def live(self) -> list[dict]:
        """Servers that still exist (any status), as the API shows them."""
        with self.lock:
            return [self._view(s) for s in self.servers.values()]

    def connection_json(self, auth: str = "application_credential") -> str:
        """A glidein_openstack connection (issue 4's layout) for this Keystone."""
        extra: dict = {"auth_type": auth, "region_name": "RegionOne"}
        if auth == "application_credential":
            login, password = "app-cred-id", "app-cred-secret"
        else:
            login, password = "glidein", "user-secret"
            extra.update(project_name="glidein", project_domain_name="Default", user_domain_name="Default")
        return json.dumps({"conn_type": "glidein_openstack", "host": f"{self.base}/identity/v3",
                           "login": login, "password": password, "extra": extra})

    def compute_calls(self) -> list:
        return [c for c in self.calls if c.path.startswith("/compute")]

    # -- the model ------------------------------------------------------------
    def _status(self, s: dict) -> str:
        if s["vm_state"] == "soft-delete":
            return "SOFT_DELETED"
        if s["vm_state"] == "error":
            return "ERROR"
        if self.clock.time() - s["created"] < self.build_seconds:
            return "BUILD"
        return "ACTIVE"

    def _view(self, s: dict) -> dict:
        status = self._status(s)
        view = {
            "id": s["id"], "name": s["name"], "status": status, "tenant_id": self.project_id,
            "user_id": self.user_id, "metadata": dict(s["metadata"]), "hostId": "", "addresses": {},
            "image": {"id": s["image"], "links": []},
            "flavor": {"original_name": s["flavor"]["name"], "vcpus": s["flavor"]["vcpus"],
                       "ram": s["flavor"]["ram"], "disk": s["flavor"]["disk"], "ephemeral": 0, "swap": 0,
                       "extra_specs": {}},
            "created": _iso(s["created"]), "updated": _iso(s["created"]),
            "links": [{"rel": "self", "href": f"{self.base}/compute/v2.1/servers/{s['id']}"}],
            "accessIPv4": "", "accessIPv6": "", "OS-DCF:diskConfig": "MANUAL", "progress": 0,
            "OS-EXT-AZ:availability_zone": "nova", "config_drive": "True" if s["config_drive"] else "",
            "key_name": s["key_name"], "OS-SRV-USG:launched_at": None if status == "BUILD" else _iso(s["created"]),
            "OS-SRV-USG:terminated_at": None, "security_groups": [{"name": g} for g in s["security_groups"]],
            "OS-EXT-STS:task_state": s["task_state"], "OS-EXT-STS:vm_state": s["vm_state"],
            "OS-EXT-STS:power_state": 1 if status == "ACTIVE" else 0,
            "os-extended-volumes:volumes_attached": [], "locked": False, "description": None,
            "tags": list(s["tags"]), "server_groups": [],
        }
        if s.get("fault"):
            view["fault"] = s["fault"]
        return view

    def limits(self) -> dict:
        """The project's absolute limits and usage (GET /limits), from its servers and their flavors."""
        cores = sum(s["flavor"]["vcpus"] for s in self.servers.values())
        ram = sum(s["flavor"]["ram"] for s in self.servers.values())
        return {"maxTotalInstances": self.quota_instances, "totalInstancesUsed": len(self.servers),
                "maxTotalCores": self.quota_cores, "totalCoresUsed": cores,
                "maxTotalRAMSize": -1, "totalRAMUsed": ram, "maxServerMeta": 128, "maxTotalKeypairs": 100}

    def create(self, body: dict, mv: tuple[int, int]) -> tuple[int, dict]:
        req = body.get("server") or {}
        if "tags" in req and mv < (2, 52):
            return 400, _err("badRequest", 400, "Invalid input for field/attribute server. Value: Additional "
                             "properties are not allowed ('tags' was unexpected)")
        if mv >= (2, 37) and "networks" not in req:
            return 400, _err("badRequest", 400, "Invalid input for field/attribute server. 'networks' is a required property")
        if req.get("imageRef") not in self.images:
            return 400, _err("badRequest", 400, "Can not find requested image")
        flavor = self.flavors.get(req.get("flavorRef"))
        if flavor is None:
            return 400, _err("badRequest", 400, "Invalid flavorRef provided.")
        nets = req.get("networks")
        if isinstance(nets, list) and any(n.get("uuid") not in self.networks for n in nets):
            return 400, _err("badRequest", 400, "Network could not be found.")
        ud = req.get("user_data")
        if ud is not None:
            try:
                raw = base64.b64decode(ud, validate=True)
            except Exception:
                return 400, _err("badRequest", 400, "Invalid input for field/attribute user_data: not base64")
            if len(ud) > 65535:
                return 400, _err("badRequest", 400, "user_data is too long")
            del raw
        meta = req.get("metadata") or {}
        if any(len(k) > 255 or len(str(v)) > 255 for k, v in meta.items()):
            return 400, _err("badRequest", 400, "Metadata key or value longer than 255 characters")
        tags = req.get("tags") or []
        if any(len(t) > 60 or "/" in t or "," in t for t in tags) or len(tags) > 50:
            return 400, _err("badRequest", 400, "Invalid server tag")
        lo, hi = int(req.get("min_count", 1)), int(req.get("max_count", req.get("min_count", 1)))
        if lo > hi:
            return 400, _err("badRequest", 400, "min_count must be <= max_count")
        room = self.quota_instances - len(self.servers)
        if room < lo:
            return 403, _err("forbidden", 403, f"Quota exceeded for instances: Requested {lo}, but already used "
                             f"{len(self.servers)} of {self.quota_instances} instances")
        if self.quota_cores >= 0:
            used = sum(s["flavor"]["vcpus"] for s in self.servers.values())
            room = min(room, (self.quota_cores - used) // flavor["vcpus"])
            if room < lo:
                return 403, _err("forbidden", 403, f"Quota exceeded for cores: Requested {lo * flavor['vcpus']}, "
                                 f"but already used {used} of {self.quota_cores} cores")
        n = min(hi, room)
        reservation = "r-" + uuid.uuid4().hex[:8]
        made = []
        for i in range(n):
            sid = self._new_id()
            error = self.error_next > 0
            self.error_next -= int(error)
            self.servers[sid] = {
                "id": sid, "name": req.get("name", "") if n == 1 else f"{req.get('name', '')}-{i + 1}",
                "image": req["imageRef"], "flavor": flavor, "metadata": dict(meta), "tags": list(tags),
                "key_name": req.get("key_name"), "config_drive": bool(req.get("config_drive")),
                "security_groups": [g["name"] for g in req.get("security_groups") or [{"name": "default"}]],
                "user_data": ud, "created": self.clock.time(), "reservation_id": reservation,
                "vm_state": "error" if error else "active", "task_state": None,
                "fault": {"code": 500, "message": "No valid host was found. "} if error else None,
            }
            made.append(sid)
        first = made[0]
        return 202, {"server": {"id": first, "links": [], "OS-DCF:diskConfig": "MANUAL",
                                "security_groups": [{"name": g} for g in self.servers[first]["security_groups"]],
                                "adminPass": "not-a-real-password"}}

    def query(self, qs: dict[str, list[str]], mv: tuple[int, int]) -> list[dict]:
        out = [s for s in self.servers.values() if self.listed(s)]
        if "name" in qs:
            rx = re.compile(qs["name"][0])
            out = [s for s in out if rx.search(s["name"])]
        if "status" in qs:
            out = [s for s in out if self._status(s) == qs["status"][0].upper()]
        if "reservation_id" in qs:
            out = [s for s in out if s["reservation_id"] == qs["reservation_id"][0]]
        if mv >= (2, 26):
            if "tags" in qs:
                want = set(qs["tags"][0].split(","))
                out = [s for s in out if want <= set(s["tags"])]
            if "tags-any" in qs:
                want = set(qs["tags-any"][0].split(","))
                out = [s for s in out if want & set(s["tags"])]
        # Nova's default order: newest first, then id
        out.sort(key=lambda s: (-s["created"], s["id"]))
        return out

    def page(self, path: str, qs: dict[str, list[str]], mv: tuple[int, int], detail: bool) -> tuple[int, dict]:
        found = self.query(qs, mv)
        if "marker" in qs:
            ids = [s["id"] for s in found]
            if qs["marker"][0] not in ids:
                return 400, _err("badRequest", 400, f"marker [{qs['marker'][0]}] not found")
            found = found[ids.index(qs["marker"][0]) + 1 :]
        limit = min(int(qs.get("limit", [self.max_limit])[0]), self.max_limit)
        page = found[:limit]
        views = [self._view(s) if detail else {"id": s["id"], "name": s["name"], "links": []} for s in page]
        body: dict = {"servers": views}
        if len(page) == limit and page:
            nxt = {k: v[0] for k, v in qs.items() if k != "marker"}
            nxt["marker"] = page[-1]["id"]
            body["servers_links"] = [{"rel": "next", "href": f"{self.base}{path}?{urlencode(nxt)}"}]
        return 200, body

    def delete(self, sid: str) -> tuple[int, dict | None]:
        s = self.servers.get(sid)
        if s is None:
            return 404, _err("itemNotFound", 404, f"Instance {sid} could not be found.")
        left = self._stuck.get(sid, 0)
        if left > 0:
            self._stuck[sid] = left - 1
            s["task_state"] = "deleting"
            return 204, None
        if self.soft_delete:
            s["vm_state"], s["task_state"] = "soft-delete", None
            return 204, None
        del self.servers[sid]
        return 204, None

    def force_delete(self, sid: str) -> tuple[int, dict | None]:
        s = self.servers.get(sid)
        if s is None:
            return 404, _err("itemNotFound", 404, f"Instance {sid} could not be found.")
        if s["vm_state"] != "soft-delete":
            return 409, _err("conflictingRequest", 409,
                             f"Cannot 'forceDelete' instance {sid} while it is in vm_state {s['vm_state']}")
        del self.servers[sid]
        return 202, None

    def token(self, body: dict) -> tuple[int, dict, str | None]:
        ident = (body.get("auth") or {}).get("identity") or {}
        methods = ident.get("methods") or []
        ok = False
        if "application_credential" in methods:
            ac = ident.get("application_credential") or {}
            ok = self.app_credentials.get(ac.get("id")) == ac.get("secret") and ac.get("secret") is not None
        elif "password" in methods:
            user = (ident.get("password") or {}).get("user") or {}
            domain = (user.get("domain") or {}).get("name") or "Default"
            ok = self.users.get((user.get("name"), domain)) == user.get("password") and user.get("password")
        if not ok:
            return 401, _err("error", 401, "The request you have made requires authentication."), None
        tok = "tok-" + uuid.uuid4().hex
        self.tokens.add(tok)
        now = time.time()  # keystoneauth checks expiry against the wall clock, whatever clock the test runs
        catalog = [
            {"type": "compute", "name": "nova", "id": "nova",
             "endpoints": [{"id": "nova-public", "interface": "public", "region": "RegionOne",
                            "region_id": "RegionOne", "url": f"{self.base}/compute/v2.1"}]},
            {"type": "identity", "name": "keystone", "id": "keystone",
             "endpoints": [{"id": "ks-public", "interface": "public", "region": "RegionOne",
                            "region_id": "RegionOne", "url": f"{self.base}/identity/v3"}]},
        ]
        token = {"methods": methods, "expires_at": _iso(now + 3600) , "issued_at": _iso(now),
                 "user": {"id": self.user_id, "name": "glidein", "domain": {"id": "default", "name": "Default"}},
                 "project": {"id": self.project_id, "name": "glidein", "domain": {"id": "default", "name": "Default"}},
                 "roles": [{"id": "member", "name": "member"}], "catalog": catalog}
        return 201, {"token": token}, tok

    def version_doc(self) -> dict:
        return {"id": "v2.1", "status": "CURRENT", "version": self.max_microversion, "min_version": "2.1",
                "updated": "2013-07-23T11:33:21Z",
                "links": [{"rel": "self", "href": f"{self.base}/compute/v2.1/"}],
                "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}]}


def _err(key: str, code: int, message: str) -> dict:
    return {key: {"code": code, "message": message}}


class _Handler(QuickHandler):
    owner: NovaServer

    def _send(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self._call.status = status

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else {}

    def _microversion(self) -> tuple[int, int] | None:
        text = self.headers.get("OpenStack-API-Version", "")
        m = re.match(r"\s*compute\s+([0-9.]+|latest)", text)
        value = m.group(1) if m else self.headers.get("X-OpenStack-Nova-API-Version", "2.1")
        if value == "latest":
            value = self.owner.max_microversion
        mv = _mv(value)
        return mv if (2, 1) <= mv <= _mv(self.owner.max_microversion) else None

    def _handle(self, method: str) -> None:
        srv = self.owner
        url = urlparse(self.path)
        body = self._body() if method in ("POST", "PUT") else {}
        self._call, retry_after = srv.log_call(method, url.path, url.query)
        if retry_after is not None:
            self._send(429, _err("overLimit", 429, "This request was rate-limited."),
                       {"Retry-After": str(max(1, math.ceil(retry_after)))})
            return
        path = url.path.rstrip("/")
        qs = parse_qs(url.query)
        with srv.lock:
            # Keystone
            if path in ("/identity", "/identity/v3") and method == "GET":
                doc = {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
                       "links": [{"rel": "self", "href": f"{srv.base}/identity/v3/"}],
                       "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}]}
                return self._send(200, {"version": doc} if path.endswith("v3") else {"versions": {"values": [doc]}})
            if path == "/identity/v3/auth/tokens" and method == "POST":
                status, doc, tok = srv.token(body)
                return self._send(status, doc, {"X-Subject-Token": tok} if tok else None)
            if not path.startswith("/compute"):
                return self._send(404, _err("itemNotFound", 404, f"no route {path}"))
            # Nova version discovery needs no token
            if path == "/compute":
                return self._send(200, {"versions": [srv.version_doc()]})
            if path == "/compute/v2.1" and method == "GET":
                return self._send(200, {"version": srv.version_doc()})
            if self.headers.get("X-Auth-Token") not in srv.tokens:
                return self._send(401, _err("unauthorized", 401, "The request you have made requires authentication."))
            mv = self._microversion()
            if mv is None:
                return self._send(406, _err("notAcceptable", 406, "Version not supported"))
            rest = path[len("/compute/v2.1"):]
            if rest == "/servers" and method == "POST":
                status, doc = srv.create(body, mv)
                if status == 202 and srv.lose_create_responses > 0:
                    srv.lose_create_responses -= 1
                    self._call.status = -1  # made, but the client never hears of it
                    self.close_connection = True
                    return
                return self._send(status, doc)
            if rest in ("/servers", "/servers/detail") and method == "GET":
                return self._send(*srv.page(url.path.rstrip("/"), qs, mv, detail=rest.endswith("detail")))
            m = re.fullmatch(r"/servers/([^/]+)", rest)
            if m and method == "GET":
                s = srv.servers.get(m.group(1))
                if s is None or not srv.listed(s):
                    return self._send(404, _err("itemNotFound", 404, f"Instance {m.group(1)} could not be found."))
                return self._send(200, {"server": srv._view(s)})
            if m and method == "DELETE":
                return self._send(*srv.delete(m.group(1)))
            m = re.fullmatch(r"/servers/([^/]+)/action", rest)
            if m and method == "POST":
                if "forceDelete" in body:
                    return self._send(*srv.force_delete(m.group(1)))
                return self._send(400, _err("badRequest", 400, f"action {sorted(body)} not emulated"))
            m = re.fullmatch(r"/flavors/([^/]+)", rest)
            if m and method == "GET" and m.group(1) != "detail":
                f = srv.flavors.get(m.group(1))
                if f is None:
                    return self._send(404, _err("itemNotFound", 404, f"Flavor {m.group(1)} could not be found."))
                return self._send(200, {"flavor": {**f, "links": []}})
            if rest == "/limits" and method == "GET":
                return self._send(200, {"limits": {"rate": [], "absolute": srv.limits()}})
            if rest in ("/flavors", "/flavors/detail") and method == "GET":
                return self._send(200, {"flavors": [{**f, "links": []} for f in srv.flavors.values()]})
            return self._send(404, _err("itemNotFound", 404, f"{method} {path} not emulated"))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")
