"""OpenStack pilots through openstacksdk's compute proxy and a ``glidein_openstack`` connection.

The compute proxy needs only Keystone and Nova in the catalog (the cloud
layer would also want Glance and Neutron). The connection is a
``glidein_openstack`` credential (airflow_glidein.secrets: auth URL, an
application credential or a user and password), or names a clouds.yaml
cloud (extra ``cloud``).

Nova has no idempotency token, so retry safety is the base class's
check-before-create by launch id. To make that listing cheap, servers carry
two server tags (entry and launch, hashed to fit Nova's 60 characters) and
a name prefix; listing ours is one ``GET /servers/detail?tags=...`` per
1000 servers (limit/marker paging), falling back to Nova's name regex
filter where the cloud's microversion is below 2.52. Our readable ids are
in the server metadata. Batches use min_count = max_count (all or nothing).

Every HTTP request, Keystone's included, goes through a transport adapter
that takes a token of the entry's API budget and backs off on 429/503.
Deletion is verified by the base class; the force step is Nova's
forceDelete, which only acts on a soft-deleted server, so a server still
refusing it gets one more DELETE and is reported if it stays.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
from collections.abc import Iterator
from datetime import datetime
from functools import cached_property
from typing import Any
from urllib.parse import parse_qs, urlparse

import requests
from requests.adapters import HTTPAdapter

from airflow_glidein import pilots as P
from airflow_glidein.hooks.base import LaunchSpec, PilotHook, Refusals, conn_fingerprint, shared_client

log = logging.getLogger(__name__)

STATE = {
    "BUILD": P.P_PENDING,
    "ACTIVE": P.P_RUNNING,
    "REBOOT": P.P_RUNNING, "HARD_REBOOT": P.P_RUNNING, "PASSWORD": P.P_RUNNING, "REBUILD": P.P_RUNNING,
    "MIGRATING": P.P_RUNNING, "RESIZE": P.P_RUNNING, "VERIFY_RESIZE": P.P_RUNNING,
    "REVERT_RESIZE": P.P_RUNNING, "RESCUE": P.P_RUNNING,
    "SHUTOFF": P.P_STOPPED, "STOPPED": P.P_STOPPED, "PAUSED": P.P_STOPPED, "SUSPENDED": P.P_STOPPED,
    "SHELVED": P.P_STOPPED, "SHELVED_OFFLOADED": P.P_STOPPED,
    "SOFT_DELETED": P.P_TERMINATING,  # deferred delete: gone for the user, still holding quota
    "DELETED": P.P_TERMINATED,
    "ERROR": P.P_ERROR, "UNKNOWN": P.P_ERROR,
}
THROTTLE_STATUS = (429, 503)
TAG_MICROVERSION = "2.52"  # server tags at create (filters need 2.26)
MAX_MICROVERSION = "2.96"


def _mv(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _digest(*parts: str, n: int = 16) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


class _BudgetAdapter(HTTPAdapter):
    """requests' transport with every request (retries too) through the hook's budget and backoff."""

    def __init__(self, hook: OpenStackPilotHook) -> None:
        super().__init__(max_retries=0)
        self.hook = hook

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        def once() -> requests.Response:
            resp = super(_BudgetAdapter, self).send(request, **kwargs)
            if resp.status_code in THROTTLE_STATUS:
                resp.content  # noqa: B018 - read it so the connection goes back to the pool
            return resp

        path = re.sub(r"/[0-9a-f-]{32,36}", "/{id}", requests.utils.urlparse(request.url).path)
        return self.hook.api_call(once, f"{request.method} {path}")


class OpenStackPilotHook(PilotHook):
    middleware = "openstack"
    conn_name_attr = "openstack_conn_id"
    default_conn_name = "openstack_default"
    conn_type = "glidein_openstack"
    hook_name = "Glidein pilots on OpenStack"

    @cached_property
    def conn(self) -> Any:
        # One logged-in connection per process and thread for the same connection content and endpoint:
        # a new one costs a Keystone token and version discovery, both charged to the endpoint's budget.
        # Its transport charges the budget of the hook that made it, which is this endpoint's.
        return shared_client(self._client_key, self._connect)

    @cached_property
    def _client_key(self) -> tuple:
        budget = self.budget
        return ("openstack", conn_fingerprint(self.conn_id), self.entry.region, budget.endpoint, budget.requests,
                budget.per_seconds, threading.get_ident())

    def _connect(self) -> Any:
        import openstack

        from airflow_glidein.secrets import OpenStackCredentialHook

        cred = OpenStackCredentialHook(self.conn_id)  # a glidein_openstack connection, secrets masked
        extra = cred.fields.extra
        region = self.entry.region or extra.get("region_name")
        if extra.get("cloud"):
            conn = openstack.connect(cloud=extra["cloud"], region_name=region, app_name="airflow-glidein")
        else:
            kwargs: dict[str, Any] = {**cred.connect_args(), "region_name": region,
                                      "interface": extra.get("interface", "public"), "app_name": "airflow-glidein"}
            for key in ("verify", "cacert"):
                if key in extra:
                    kwargs[key] = extra[key]
            conn = openstack.connection.Connection(**kwargs)
        adapter = _BudgetAdapter(self)
        conn.session.session.mount("http://", adapter)
        conn.session.session.mount("https://", adapter)
        return conn

    @cached_property
    def microversion(self) -> str:
        """The highest compute microversion both Nova and we speak (one discovery call, cached)."""
        from openstack import utils

        return utils.maximum_supported_microversion(self.conn.compute, MAX_MICROVERSION) or "2.1"

    @cached_property
    def tagged(self) -> bool:
        """Server tags at create and as list filters (Nova 2.52+), unless the entry turns them off."""
        if not self.entry.options.get("server_tags", True):
            return False
        return _mv(self.microversion) >= _mv(TAG_MICROVERSION)

    @cached_property
    def flavor_id(self) -> str:
        # by name costs two calls (a get, then the list): once per connection, not per hook
        return shared_client((*self._client_key, "flavor", self.entry.flavor),
                             lambda: self.conn.compute.find_flavor(self.entry.flavor, ignore_missing=False).id)

    # -- names and tags ----------------------------------------------------
    @property
    def entry_tag(self) -> str:
        return f"glidein-{_digest(self.factory, self.entry.name)}"

    def launch_tag(self, launch_id: str) -> str:
        return f"glidein-launch-{_digest(self.factory, self.entry.name, launch_id)}"

    @property
    def name_prefix(self) -> str:
        return f"glidein-{self.factory}-{self.entry.name}-"

    def server_name(self, launch_id: str) -> str:
        return self.name_prefix + _digest(launch_id, n=10)

    # -- the interface -----------------------------------------------------
    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        if self.tagged:
            tags = [self.entry_tag] + ([self.launch_tag(launch_id)] if launch_id else [])
            query = {"tags": ",".join(tags)}
        else:
            name = self.server_name(launch_id) if launch_id else self.name_prefix
            query = {"name": "^" + re.escape(name)}
        out = []
        for server in self._servers(query):
            meta = server.get("metadata") or {}
            if meta.get(P.TAG_FACTORY) != self.factory or meta.get(P.TAG_ENTRY) != self.entry.name:
                continue  # a name that only looks like ours
            if launch_id and meta.get(P.TAG_LAUNCH) != launch_id:
                continue
            out.append(_instance(server))
        return out

    def _servers(self, query: dict[str, str]) -> Iterator[dict]:
        """``GET /servers/detail`` through the compute proxy, following Nova's next links.

        Plain JSON rather than the SDK's Server resources: the same calls,
        without the SDK's per-resource cost, which dominates at a few hundred servers.
        """
        from openstack import exceptions

        params: dict[str, Any] = dict(query)
        while True:
            resp = self.conn.compute.get("/servers/detail", params=params, microversion=self.microversion)
            exceptions.raise_from_response(resp)
            body = resp.json()
            yield from body.get("servers") or []
            nxt = [link["href"] for link in body.get("servers_links") or [] if link.get("rel") == "next"]
            if not nxt or not body.get("servers"):
                return
            params = {k: v[-1] for k, v in parse_qs(urlparse(nxt[0]).query).items()}

    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        opts = self.entry.options
        attrs: dict[str, Any] = {
            "name": self.server_name(spec.launch_id),
            "image_id": spec.image,
            "flavor_id": self.flavor_id,
            "user_data": base64.b64encode(spec.userdata.encode()).decode(),
            "metadata": {k: str(v)[:255] for k, v in tags.items()},
        }
        networks = opts.get("networks") or ([opts["network"]] if opts.get("network") else [])
        if networks:
            attrs["networks"] = [{"uuid": n} for n in networks]
        else:
            attrs["networks"] = "auto"  # required from 2.37; "auto" is Nova's own default network choice
        if opts.get("key_name"):
            attrs["key_name"] = opts["key_name"]
        if opts.get("security_groups"):
            attrs["security_groups"] = [{"name": g} for g in opts["security_groups"]]
        if opts.get("config_drive"):
            attrs["config_drive"] = True
        if opts.get("availability_zone"):
            attrs["availability_zone"] = opts["availability_zone"]
        if self.tagged:
            attrs["tags"] = [self.entry_tag, self.launch_tag(spec.launch_id)]
        if opts.get("multi_create", True):
            # One call for the batch; Nova answers with the first server only, the listing has them all.
            self.conn.compute.create_server(min_count=count, max_count=count, **attrs)
        else:
            for _ in range(count):
                self.conn.compute.create_server(**attrs)
        return self._list(spec.launch_id)

    def _terminate(self, ids: list[str]) -> Refusals:
        from openstack import exceptions

        refused = {}
        for sid in ids:
            try:
                self.conn.compute.delete_server(sid, ignore_missing=True)
            except exceptions.HttpException as exc:
                refused[sid] = _message(exc)
        return refused

    def _force_terminate(self, ids: list[str]) -> Refusals:
        from openstack import exceptions

        refused = {}
        for sid in ids:
            try:
                self.conn.compute.delete_server(sid, force=True)
            except exceptions.NotFoundException:
                continue
            except exceptions.ConflictException as exc:
                # forceDelete acts only on soft-deleted servers: one more DELETE, and say why it stays
                refused[sid] = _message(exc)
                refused.update({k: f"{refused[sid]}; then {v}" for k, v in self._terminate([sid]).items()})
            except exceptions.HttpException as exc:
                refused[sid] = _message(exc)
        return refused

    def _needs_force(self, inst: P.ProviderInstance) -> bool:
        return inst.detail.startswith("SOFT_DELETED")

    def _throttled(self, outcome: Any) -> float | None:
        if isinstance(outcome, requests.Response) and outcome.status_code in THROTTLE_STATUS:
            try:
                return float(outcome.headers.get("Retry-After", 0))
            except ValueError:  # an HTTP date: let the backoff decide
                return 0.0
        return None

    def quota_scope(self) -> tuple:
        return ("openstack", self.entry.region, self.entry.api_endpoint)  # the project's quota at a region

    def quota(self) -> dict[str, int] | None:
        a = self.conn.compute.get_limits().absolute  # one GET /limits: the project's limits and usage
        out = {}
        for name, limit, used in (("instances", a.instances, a.instances_used),
                                  ("cores", a.total_cores, a.total_cores_used),
                                  ("memory_mb", a.total_ram, a.total_ram_used)):
            if limit is not None and int(limit) >= 0:  # -1: unlimited
                out[name] = max(int(limit) - int(used or 0), 0)
        return out

    def entry_checks(self) -> list[tuple[str, Any]]:
        def flavor() -> tuple[bool, str]:
            f = self.conn.compute.get_flavor(self.flavor_id)
            return self.cores_fit(f.vcpus, f.ram)

        # the image is Glance's, which this hook does not talk to: Nova refuses a create with a bad one
        return [(f"flavor {self.entry.flavor}", flavor)]

    def test_connection(self) -> tuple[bool, str]:
        try:
            n = len(list(self.conn.compute.servers(details=False, limit=1, paginated=False)))
            return True, f"Nova answered ({n} server listed)"
        except Exception as exc:
            return False, str(exc)


def _message(exc: Exception) -> str:
    return str(getattr(exc, "details", None) or exc)[:300]


def _epoch(text: str | None) -> float:
    if not text:
        return 0.0
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _instance(server: dict) -> P.ProviderInstance:
    """A server as Nova's JSON has it (``/servers/detail``)."""
    status = (server.get("status") or "UNKNOWN").upper()
    task = server.get("OS-EXT-STS:task_state")
    state = STATE.get(status, P.P_ERROR)
    if task == "deleting" and state != P.P_TERMINATED:
        state = P.P_TERMINATING
    fault = server.get("fault")
    fault = fault.get("message", "") if isinstance(fault, dict) else ""
    detail = fault or (f"{status}, task {task}" if task else status)
    meta = server.get("metadata") or {}
    return P.ProviderInstance(
        id=server["id"],
        state=state,
        launched=_epoch(server.get("created")),
        tags={k: v for k, v in meta.items() if k.startswith("glidein:")},
        detail=detail.strip(),
    )
