"""A toy middleware in one module: the "loopback cloud", its hook and its description.

The loopback cloud is a tiny JSON-over-HTTP service on 127.0.0.1 that keeps
"instances" (records, nothing boots) in memory: create in batches, list by
tags, delete, a quota, images and flavors. It is not a stand-in for any real
provider; it exists to show that a middleware is one module. Registered
through the entry point group ``airflow_glidein.middlewares`` as
``loopback = tests.loopback_cloud:MIDDLEWARE``, this module alone adds:

- the middleware ``loopback`` with its entry options (``zone``, ``max_per_call``),
  a 4 KiB UserData limit and its hook;
- the credential type ``loopback_token`` (auth method ``loopback_token``),
  held in a ``loopback_cloud`` connection (host = the cloud's URL, password =
  the token), with its reader, its connection form and its "Test" hook.

Like real clouds it can refuse: a create beyond the quota answers 403.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any
from urllib.parse import parse_qs, urlparse

from pydantic import Field

from airflow_glidein import material
from airflow_glidein import pilots as P
from airflow_glidein.hooks.base import LaunchSpec, PilotHook
from airflow_glidein.middlewares import CredentialType, EntryOptions, Middleware, form_hidden
from airflow_glidein.secrets import CredentialHook, read_conn

CONN_TYPE = "loopback_cloud"


# -- the cloud ---------------------------------------------------------------

class LoopbackCloud:
    """The service: instances in memory, every request logged as (method, path)."""

    def __init__(self, token: str, images: tuple[str, ...] = ("img-pilot",),
                 flavors: dict[str, tuple[int, int]] | None = None, max_instances: int | None = None) -> None:
        self.token = token
        self.images = set(images)
        self.flavors = flavors or {"small": (2, 4096), "large": (8, 16384)}  # cores, memory MB
        self.max_instances = max_instances
        self.instances: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> LoopbackCloud:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def live(self) -> list[dict[str, Any]]:
        return [i for i in self.instances.values() if i["state"] != "deleted"]

    def connection_json(self) -> str:
        return json.dumps({"conn_type": CONN_TYPE, "host": self.url, "password": self.token})

    def answer(self, method: str, url: str, body: Any) -> tuple[int, Any]:
        path, query = urlparse(url).path, parse_qs(urlparse(url).query)
        parts = path.strip("/").split("/")
        with self._lock:
            if method == "GET" and parts == ["quota"]:
                left = None if self.max_instances is None else self.max_instances - len(self.live())
                return 200, {"instances": left}
            if method == "GET" and len(parts) == 2 and parts[0] == "images":
                return (200, {"id": parts[1]}) if parts[1] in self.images else (404, {"error": "no such image"})
            if method == "GET" and len(parts) == 2 and parts[0] == "flavors":
                if parts[1] not in self.flavors:
                    return 404, {"error": "no such flavor"}
                cores, memory = self.flavors[parts[1]]
                return 200, {"name": parts[1], "cores": cores, "memory_mb": memory}
            if method == "GET" and parts == ["instances"]:
                wanted = dict(t.split("=", 1) for t in query.get("tag", []))
                return 200, [i for i in self.live() if wanted.items() <= i["tags"].items()]
            if method == "POST" and parts == ["instances"]:
                count = int(body["count"])
                if self.max_instances is not None and len(self.live()) + count > self.max_instances:
                    return 403, {"error": "instance quota exceeded"}
                made = []
                for _ in range(count):
                    iid = f"lb-{next(self._ids):05d}"
                    self.instances[iid] = {"id": iid, "state": "running", "launched": time.time(),
                                           "image": body["image"], "flavor": body["flavor"],
                                           "zone": body["zone"], "userdata": body["userdata"], "tags": body["tags"]}
                    made.append(self.instances[iid])
                return 201, made
            if method == "DELETE" and len(parts) == 2 and parts[0] == "instances":
                if parts[1] in self.instances:
                    self.instances[parts[1]]["state"] = "deleted"
                return 204, None
        return 404, {"error": "no such call"}


def _handler(cloud: LoopbackCloud) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            cloud.calls.append((self.command, urlparse(self.path).path))
            if self.headers.get("Authorization") != f"Bearer {cloud.token}":
                status, body = 401, {"error": "bad token"}
            else:
                length = int(self.headers.get("Content-Length") or 0)
                sent = json.loads(self.rfile.read(length)) if length else None
                status, body = cloud.answer(self.command, self.path, sent)
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


# -- the hook ----------------------------------------------------------------

class LoopbackError(RuntimeError):
    pass


class LoopbackCloudHook(PilotHook):
    middleware = "loopback"
    conn_name_attr = "loopback_conn_id"
    default_conn_name = "loopback_default"
    conn_type = CONN_TYPE
    hook_name = "Glidein pilots on the loopback cloud"

    @cached_property
    def _conn(self) -> material.ConnFields:
        return read_conn(self.conn_id)  # secrets masked as they are read

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        def send() -> Any:
            req = urllib.request.Request(f"{self._conn.host.rstrip('/')}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self._conn.password}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    data = resp.read()
            except urllib.error.HTTPError as exc:
                why = json.loads(exc.read() or b"{}").get("error")
                raise LoopbackError(f"{method} {path}: {exc.code} {why}") from None
            return json.loads(data) if data else None

        return self.api_call(send, f"{method} {path}")

    def _tag_query(self, launch_id: str | None) -> str:
        tags = {P.TAG_FACTORY: self.factory, P.TAG_ENTRY: self.entry.name}
        if launch_id:
            tags[P.TAG_LAUNCH] = launch_id
        return "&".join(f"tag={urllib.request.quote(f'{k}={v}')}" for k, v in tags.items())

    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        return [P.ProviderInstance(id=i["id"], state=P.P_RUNNING, launched=i["launched"], tags=i["tags"])
                for i in self._call("GET", f"/instances?{self._tag_query(launch_id)}")]

    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        per_call = self.entry.options["max_per_call"]  # the schema's default filled in
        made = []
        for start in range(0, count, per_call):
            made += self._call("POST", "/instances", {
                "count": min(per_call, count - start), "image": spec.image, "flavor": self.entry.flavor,
                "zone": self.entry.options["zone"], "userdata": spec.userdata, "tags": tags})
        return [P.ProviderInstance(id=i["id"], state=P.P_RUNNING, launched=i["launched"], tags=i["tags"])
                for i in made]

    def _terminate(self, ids: list[str]) -> None:
        for iid in ids:
            self._call("DELETE", f"/instances/{iid}")

    def quota(self) -> dict[str, int] | None:
        left = self._call("GET", "/quota")["instances"]
        return {} if left is None else {"instances": left}

    def entry_checks(self) -> list[tuple[str, Any]]:
        def image() -> tuple[bool, str]:
            return self._call("GET", f"/images/{self.entry.image}")["id"] == self.entry.image, "exists"

        def flavor() -> tuple[bool, str]:
            f = self._call("GET", f"/flavors/{self.entry.flavor}")
            return self.cores_fit(f["cores"], f["memory_mb"])

        return [(f"image {self.entry.image}", image), (f"flavor {self.entry.flavor}", flavor)]

    def test_connection(self) -> tuple[bool, str]:
        try:
            self._call("GET", "/quota")
            return True, f"the loopback cloud at {self._conn.host} answers"
        except Exception as exc:
            return False, str(exc)


# -- its credential type, connection form and "Test" hook -----------------------

def read_loopback_token(conn: material.ConnFields, now: float) -> tuple[float | None, dict]:
    if not (conn.host or "").startswith("http://127."):
        raise material.Invalid("the host field must be the loopback cloud's URL (http://127.x.x.x:port)")
    if not conn.password:
        raise material.Invalid("no token in the connection (password field)")
    return None, {"cloud": conn.host}


class LoopbackCredentialHook(CredentialHook):
    conn_type = CONN_TYPE
    hook_name = "Loopback cloud token"


class LoopbackOptions(EntryOptions):
    zone: str = "a"
    max_per_call: Annotated[int, Field(gt=0, le=50)] = 5  # instances per create call


MIDDLEWARE = Middleware(
    name="loopback",
    hook="tests.loopback_cloud.LoopbackCloudHook",
    provision_types=("loopback_token",),
    userdata_max_bytes=4096,
    options=LoopbackOptions,
    credential_types=(CredentialType("loopback_token", (CONN_TYPE,), frozenset({"loopback_token"}),
                                     read_loopback_token),),
    connection_forms=({
        "connection-type": CONN_TYPE,
        "hook-class-name": "tests.loopback_cloud.LoopbackCredentialHook",
        "hook-name": "Loopback cloud token",
        "conn-fields": {},
        "ui-field-behaviour": {"hidden-fields": form_hidden("host", "password"),
                               "relabeling": {"host": "Cloud URL", "password": "Token"}},
    },),
)
