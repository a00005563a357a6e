"""The bootstrap service: what booting pilots talk to, and where their logs are read.

Pilot routes (under /bootstrap) authenticate with the launch's bootstrap
token or the pilot's upload token, never with Airflow users; they are the
only unauthenticated surface. The log viewer routes (under /pilots) exist
only in the plugin's app, served by the Airflow API server, and need a user
who may read the factory DAG's task logs.

Replies to pilots are ``key=value`` lines, so a POSIX sh script reads them
with sed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import math
import os
import threading
import time
from functools import lru_cache
from urllib.parse import quote
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response

from airflow_glidein import budget, metrics, middlewares, pilotdb, userdata
from airflow_glidein.bootstrap import guard, identity, keys, listings, tokens
from airflow_glidein.bootstrap.guard import clean
from airflow_glidein.bootstrap.launches import startup_script
from airflow_glidein.bootstrap.logs import LogRefused, LogStore, check_name
from airflow_glidein.config import Config, Entry, get_config
from airflow_glidein.state import StateStore, store

log = logging.getLogger(__name__)
FACTORY_DAG = "glidein_factory"
MAX_HEADERS = 16 * 1024  # bytes of request headers (a pilot sends a few hundred)
SECRET_TTL = 10.0  # s a pilot credential read from its connection is reused
LISTINGS_AT_ONCE = 4  # provider listings one service process makes at a time
Refusal = tokens.Refused | LogRefused


def _literal(value: Any) -> str:
    """A ClassAd literal for an entry attribute."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lines(fields: dict[str, Any]) -> str:
    return "".join(f"{k}={' '.join(str(v).splitlines())}\n" for k, v in fields.items())


class Service:
    """What the routes share; everything is resolved on first use (the plugin imports this at start-up)."""

    def __init__(self, config_file: str | None = None, state_url: str | None = None) -> None:
        self.config_file = config_file
        self.state_url = state_url
        self.listings = listings.LaunchListings()
        self.limiter = guard.Limiter()
        self._secrets: dict[str, tuple[float, str]] = {}
        self._listing = threading.Semaphore(LISTINGS_AT_ONCE)

    @property
    def config(self) -> Config:
        return get_config(self.config_file)

    @property
    def store(self) -> StateStore:
        return store(self.state_url)

    @property
    def logs(self) -> LogStore:
        return LogStore.from_config()  # cheap; follows [glidein] pilot_logs changes

    def entry(self, launch: tokens.Launch) -> Entry:
        try:
            return self.config.entry(launch.entry)
        except (StopIteration, KeyError):
            raise tokens.Refused(403, f"entry {launch.entry} is no longer configured", "unknown_entry") from None

    def admitter(self, seen: dict[str, Any]) -> tokens.Admit:
        """Per-token limit on refusals: a token whose requests were refused too often lately is turned away
        (a launch's token may be refused 2 per VM + 10 a minute, an upload token 2 per file + 10). What
        succeeds does not count, so a launch's boot storm is never slowed by its own size."""

        def admit(kind: str, hashed: str, launch: tokens.Launch) -> None:
            per_minute = 2 * launch.count + 10 if kind != tokens.UPLOAD else 2 * self.logs.max_files + 10
            seen["token"] = (hashed, per_minute)
            wait = self.limiter.token_blocked(hashed, per_minute)
            if wait:
                raise tokens.Refused(429, f"too many refused requests with this {kind} token lately; slow down",
                                     "rate_limited_token", retry_after=math.ceil(wait))

        return admit

    async def check_listed(self, launch: tokens.Launch, claimed: str, recorded: bool = False) -> str:
        """The pilot's id ``claimed`` names (itself, or the pilot an alias belongs to); refused unless it is one
        of the launch's: the factory's record (unless the caller looked already), else the launch's listing
        (shared, at most one per interval; waited for, not slept on)."""
        if not recorded:
            pid = await to_thread.run_sync(pilotdb.resolve, self.store, launch.entry, launch.launch_id, claimed)
            if pid is not None:
                return pid
        try:
            found = await self.listings.find(self.store, launch.launch_id, claimed, lambda: self._list(launch),
                                             guard.Settings.read().listing_interval)
        except listings.Unavailable as exc:
            raise tokens.Refused(503, str(exc), "unavailable", retry_after=exc.retry_after) from None
        tokens.check_listed(found is not None, launch, claimed)
        assert found is not None
        return found

    def _list(self, launch: tokens.Launch) -> dict[str, str]:
        """One provider listing of the launch, never waiting for the API budget nor backing off: {each id a pilot
        may claim (its own, its aliases): the pilot's id}. Listing never acts on a pilot (held grid jobs are
        the factory's inventory's to release or remove)."""
        from airflow_glidein.hooks import pilot_hook

        hook = pilot_hook(self.entry(launch), launch.factory, launch.provision_conn)
        hook.throttle_retries = 0  # a throttled listing is a failed one: the next comes after the interval
        metrics.incr(1, "bootstrap", "listings", launch.entry, entry=launch.entry)
        try:
            with self._listing, budget.no_wait():  # the first also builds the provider client the others share
                found = hook.list_launch(launch.launch_id)
        except budget.BudgetExhausted as exc:
            raise listings.ListingFailed(f"the API budget of entry {launch.entry} is spent; try again",
                                         exc.retry_after) from None
        log.info("Listed launch %s at %s for the bootstrap service: %d instances", launch.launch_id, launch.entry,
                 len(found))
        return {name: i.id for i in found if i.launch_id == launch.launch_id for name in (i.id, *i.aliases)}

    async def exchange(self, token: str, claimed: str, proof: dict[str, str],
                       admit: tokens.Admit) -> tuple[tokens.Launch, str, str, float, str]:
        """``tokens.exchange``'s steps, with the provider's listing (when the factory's record cannot tell)
        waited for asynchronously. Returns (launch, the pilot's id, upload token, its expiry, credential): an
        alias (an EC2 GAHP job's instance id) is bound under the pilot it belongs to."""
        def known(conn: Any, launch: tokens.Launch, pid: str) -> str | None:  # without a provider call
            try:
                identity.verify_ec2(self.entry(launch), pid, proof)
            except identity.IdentityRefused as exc:
                raise tokens.Refused(403, str(exc), "identity") from None
            except identity.CertificateUnusable as exc:
                log.error("%s: exchanges at this entry are refused until it is fixed", exc)
                raise tokens.Refused(503, "the service cannot check instance identity documents now; try again",
                                     "identity_cert", retry_after=60) from None
            return self.listings.known(launch.launch_id, pid) or pilotdb.resolve(conn, launch.entry,
                                                                                 launch.launch_id, pid)

        now = time.time()
        launch, pilot_id, bound = await to_thread.run_sync(tokens.begin_exchange, self.store, token, claimed, now,
                                                           self.pilot_secret, admit, known)
        if bound is None:
            pilot_id = await self.check_listed(launch, claimed, recorded=True)
            bound = await to_thread.run_sync(tokens.finish_exchange, self.store, launch, pilot_id, now,
                                             self.pilot_secret)
        return (launch, pilot_id, *bound)

    def pilot_secret(self, launch: tokens.Launch) -> str:
        """The launch's pilot credential, read from its Airflow connection ('' when the launch has none);
        kept a few seconds, as a boot storm asks for the same one thousands of times."""
        if not launch.pilot_credential:
            return ""
        now = time.monotonic()
        cached = self._secrets.get(launch.pilot_credential)
        if cached and now - cached[0] < SECRET_TTL:
            return cached[1]
        from airflow_glidein import secrets

        try:
            secret = secrets.pilot_payload(self.config, launch.pilot_credential)
        except Exception as exc:
            log.warning("Pilot credential %s unavailable: %s", launch.pilot_credential, clean(exc, 300))
            raise tokens.Refused(503, f"pilot credential {launch.pilot_credential} is unavailable now; try again",
                                 "credential", retry_after=10) from None
        self._secrets[launch.pilot_credential] = (now, secret)
        return secret

    def handover(self, launch: tokens.Launch, pilot_id: str, claimed: str, upload: str, upload_expires: float,
                 secret: str, now: float) -> str:
        cfg = self.config
        entry = cfg.entry(launch.entry)
        p = launch.policy
        # the lifetime runs from the start: a VM starts when launched; a grid job that queued starts about now
        start = now if middlewares.get(entry.middleware).queued else launch.created
        to_retire = int(start + p["max_lifetime"])
        fields: dict[str, Any] = {
            "pilot_id": pilot_id,
            "instance_id": claimed,  # the id it claimed: its own, or an alias (an EC2 GAHP job's instance id)
            "pilot_key": f"{launch.entry}/{pilot_id}",  # the startd's GLIDEIN_PILOT_ID: ids collide across endpoints
            "launch_id": launch.launch_id,
            "entry": launch.entry,
            "frontend": launch.frontend,
            "factory": launch.factory,
            "collector": cfg.factory.collector or "",
            "start_expr": launch.start_expr,
            "idle_timeout": p["idle_timeout"],
            "max_lifetime": p["max_lifetime"],
            "to_retire": to_retire,
            "to_die": to_retire + p.get("retire_window", 0),
            "cpus": entry.cores,
            "memory_mb": entry.memory_mb,
            "upload_token": upload,
            "upload_expires": int(upload_expires),
            "log_max_bytes": self.logs.max_file,
            "credential_b64": base64.b64encode(secret.encode()).decode(),
        }
        fields.update({f"attr.{k}": _literal(v) for k, v in sorted(entry.attrs.items())})
        return _lines(fields)

    def release(self, name: str) -> str:
        """The file of the HTCondor release ``name`` the factory serves, once it matches its configured SHA-256
        (a file replaced under the service is refused here, not by thousands of pilots one by one)."""
        tarball = self.config.factory.condor_tarballs.get(name)
        if tarball is None:
            raise tokens.Refused(404, f"the factory serves no HTCondor release {name}", "unknown_release")
        try:
            got = _sha256(tarball.path, *_stamp(tarball.path))
        except OSError as exc:
            log.error("HTCondor release %s cannot be read (%s: %s); it is not served", name, type(exc).__name__,
                      clean(exc, 200))
            got = None
        if got != tarball.sha256:
            if got is not None:
                log.error("HTCondor release %s: the file has SHA-256 %s, factory.condor_tarballs says %s; it is not "
                          "served", name, got, tarball.sha256)
            raise tokens.Refused(503, f"HTCondor release {name} is unavailable now; try again", "release",
                                 retry_after=60)
        return tarball.path

    def refuse(self, what: str, exc: Refusal, request: Request, subject: str,
               seen: dict[str, Any]) -> PlainTextResponse:
        """One log line and one metric per refusal, counted against the token; the reply says why (escaped:
        it may quote the request)."""
        metrics.incr(1, "bootstrap", "refused", exc.reason, reason=exc.reason, route=what)
        if "token" in seen and exc.status != 429 and exc.reason not in ("unavailable", "credential", "release"):
            self.limiter.token_refused(*seen["token"])
        client = clean(_client(request), 60)
        if exc.reason == "rebind":
            log.warning("Instance %s claimed again from %s: %s (a clone of a VM, or someone else's id); refused",
                        subject, client, clean(exc, 300))
        elif exc.reason == "disconnected":
            log.info("%s from %s: %s; nothing replaced", what, client, clean(exc, 300))
        else:
            log.warning("%s for %s from %s refused (%s): %s", what, subject, client, exc.reason, clean(exc, 300))
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return PlainTextResponse(f"error={clean(exc, 500)}\n", status_code=exc.status, headers=headers)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A release's SHA-256, read once per version of the file (size and mtime key it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _client(request: Request) -> str:
    return request.scope.get("state", {}).get("glidein_client") or (request.client.host if request.client else "?")


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise tokens.Refused(401, "send the token as 'Authorization: Bearer <token>'", "no_token")
    return token.strip()


async def _small_body(request: Request, limit: int) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise LogRefused(413, f"request body over {limit} bytes", "too_large")
    return body


class Guard:
    """ASGI middleware: finds the client's address, turns away an address over its request rate or with too
    many refusals lately (429 + Retry-After, before any database work), and counts each refusal against it."""

    def __init__(self, app: Any, svc: Service) -> None:
        self.app, self.svc = app, svc

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = guard.Settings.read()
        addr = guard.client_address(scope, s.trusted_proxies)
        scope.setdefault("state", {})["glidein_client"] = addr
        if sum(len(k) + len(v) for k, v in scope.get("headers") or []) > MAX_HEADERS:
            self.svc.limiter.refused(addr, s)
            metrics.incr(1, "bootstrap", "refused", "headers", reason="headers")
            reply = PlainTextResponse(f"error=request headers over {MAX_HEADERS} bytes\n", status_code=431)
            return await reply(scope, receive, send)
        wait = self.svc.limiter.admit(addr, s)
        if wait:
            metrics.incr(1, "bootstrap", "refused", "rate_limited_address", reason="rate_limited_address")
            reply = PlainTextResponse("error=too many requests (or refused requests) from this address; slow down\n",
                                      status_code=429, headers={"Retry-After": str(math.ceil(wait))})
            return await reply(scope, receive, send)
        status = 0

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if 400 <= status < 500 and status != 429:
            self.svc.limiter.refused(addr, s)


def create_app(*, ui: bool, config_file: str | None = None, state_url: str | None = None) -> FastAPI:
    """The bootstrap app; ``ui`` adds the authenticated log viewer (needs Airflow's API server)."""
    svc = Service(config_file, state_url)
    app = FastAPI(title="airflow-glidein bootstrap service", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.glidein = svc
    app.add_middleware(Guard, svc=svc)

    @app.api_route("/bootstrap/startup.sh", methods=["GET", "HEAD"])
    def get_startup() -> Response:
        return Response(startup_script(), media_type="text/x-shellscript")

    def pem(pick) -> Response:
        try:
            ring = keys.key_ring(svc.store)
        except keys.KeyUnavailable as exc:
            log.error("Cannot serve the factory's public key: %s", exc)
            return PlainTextResponse("error=the factory's signing key is unavailable now; try again\n", status_code=503)
        key = pick(ring)
        if key is None:
            return PlainTextResponse("error=no such factory key (neither the current nor the previous one)\n",
                                     status_code=404)
        return Response(userdata.public_pem(key), media_type="application/x-pem-file")

    @app.api_route("/bootstrap/pubkey.pem", methods=["GET", "HEAD"])
    def get_pubkey() -> Response:
        return pem(lambda ring: ring.signing.public_key())

    @app.api_route("/bootstrap/pubkeys/{key_id}.pem", methods=["GET", "HEAD"])
    def get_pubkey_by_id(key_id: str) -> Response:
        """The current or the previous key by its id: images that pin fingerprints fetch the one an envelope names."""
        return pem(lambda ring: ring.accepted().get(key_id))

    @app.post("/bootstrap/exchange")
    async def post_exchange(request: Request, instance_id: Annotated[str, Query(max_length=255)],
                            authorization: Annotated[str | None, Header()] = None) -> Response:
        seen: dict[str, Any] = {}
        try:
            token = _bearer(authorization)
            check_name(instance_id, "instance id")
            proof = identity.parse_body(await _small_body(request, identity.MAX_BODY))
            launch, pilot_id, upload, expires, secret = await svc.exchange(token, instance_id, proof,
                                                                          svc.admitter(seen))
        except (tokens.Refused, LogRefused) as exc:
            return svc.refuse("Exchange", exc, request, f"instance {clean(instance_id)}", seen)
        metrics.incr(1, "bootstrap", "exchanges", launch.entry, entry=launch.entry)
        log.info("Pilot %s of launch %s at %s exchanged its bootstrap token%s", pilot_id, launch.launch_id,
                 launch.entry, f" (as instance {instance_id})" if instance_id != pilot_id else "")
        return PlainTextResponse(svc.handover(launch, pilot_id, instance_id, upload, expires, secret, time.time()))

    @app.api_route("/bootstrap/condor/{name}.tar.gz", methods=["GET", "HEAD"])
    async def get_release(name: str, request: Request,
                          authorization: Annotated[str | None, Header()] = None) -> Response:
        """The factory's HTCondor release, for a pilot that exchanged its token (its upload token) on a worker node
        without HTCondor; the pilot checks it against the SHA-256 in its signed envelope."""
        seen: dict[str, Any] = {}
        try:
            token = _bearer(authorization)
            check_name(name, "release name")
            entry, pilot_id = await to_thread.run_sync(tokens.pilot_of, svc.store, token, time.time(),
                                                       svc.admitter(seen))
            path = await to_thread.run_sync(svc.release, name)
        except (tokens.Refused, LogRefused) as exc:
            return svc.refuse("HTCondor release", exc, request, f"release {clean(name)}", seen)
        metrics.incr(1, "bootstrap", "releases", entry, entry=entry)
        log.info("Pilot %s at %s fetches HTCondor release %s", pilot_id, entry, name)
        return FileResponse(path, media_type="application/gzip")

    @app.put("/bootstrap/logs/{name:path}")
    async def put_log(name: str, request: Request, instance_id: Annotated[str | None, Query(max_length=255)] = None,
                      authorization: Annotated[str | None, Header()] = None,
                      content_length: Annotated[int | None, Header(ge=0)] = None) -> Response:
        subject = f"log {clean(name, 80)} of instance {clean(instance_id)}"
        seen: dict[str, Any] = {}
        try:
            token = _bearer(authorization)
            check_name(name)
            if instance_id is not None:
                check_name(instance_id, "instance id")
            entry, pilot_id, early = await to_thread.run_sync(
                tokens.uploader, svc.store, token, time.time(), instance_id, svc.admitter(seen))
            if early is not None:  # a bootstrap token, for an instance it claims (an alias: for its pilot)
                pilot_id = await svc.check_listed(early, pilot_id)
                await to_thread.run_sync(tokens.unbound, svc.store, early, pilot_id)
            subject = f"log {name} of pilot {pilot_id} at {entry}"
            size = await svc.logs.write(svc.store, entry, pilot_id, name, request.stream(), content_length,
                                        early is not None)
        except (tokens.Refused, LogRefused) as exc:
            return svc.refuse("Log upload", exc, request, subject, seen)
        metrics.incr(1, "bootstrap", "uploads", entry, entry=entry)
        metrics.incr(size, "bootstrap", "upload_bytes", entry, entry=entry)
        log.info("Pilot %s at %s uploaded %s (%d bytes)", pilot_id, entry, name, size)
        return PlainTextResponse(f"stored={name}\nbytes={size}\n")

    if ui:
        app.mount("/pilots", Lazy(lambda: _viewer(svc)))
    return app


def _may_read_factory_logs() -> Any:
    """A user who may read the factory DAG's task logs may read its pilots' logs."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import get_user

    def check(user: Any = Depends(get_user)) -> None:  # noqa: B008 - FastAPI's dependency idiom
        from airflow.api_fastapi.app import get_auth_manager  # only in the API server, where it is loaded

        if not get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.TASK_LOGS,
                                                    details=DagDetails(id=FACTORY_DAG), user=user):
            raise HTTPException(403, f"reading pilot logs needs read access to the task logs of {FACTORY_DAG}")

    return check


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>body{{font-family:sans-serif;margin:1em}}td{{padding:0 1em 0 0}}</style></head>"
                        f"<body><h2>{html.escape(title)}</h2>{body}</body></html>")


class Lazy:
    """An ASGI app built on its first request: the viewer's Airflow auth imports take a second or
    more, and the plugin module is imported by every Airflow process, not only the API server."""

    def __init__(self, build: Any) -> None:
        self.build, self.app = build, None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.app is None:
            self.app = self.build()
        await self.app(scope, receive, send)


def _href(*parts: str) -> str:
    """A relative link: right behind any prefix or proxy (the index is served at .../pilots/)."""
    return html.escape("/".join(quote(p, safe="") for p in parts))


def _viewer(svc: Service) -> FastAPI:
    viewer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None,
                     dependencies=[Depends(_may_read_factory_logs())])

    def guarded(fn):
        try:
            return fn()
        except LogRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @viewer.api_route("/", methods=["GET", "HEAD"])
    def pilots_index() -> HTMLResponse:
        rows = "".join(
            f"<tr><td>{html.escape(e)}</td><td><a href='{_href(e, p)}'>"
            f"{html.escape(p)}</a></td></tr>" for e, p in guarded(svc.logs.pilots))
        return _page("Pilot logs", f"<table><tr><th>entry</th><th>pilot</th></tr>{rows}</table>"
                     if rows else "<p>No pilot has uploaded logs yet.</p>")

    @viewer.api_route("/{entry}/{pilot_id}", methods=["GET", "HEAD"])
    def pilot_logs(entry: str, pilot_id: str) -> HTMLResponse:
        files = guarded(lambda: svc.logs.list(entry, pilot_id))
        rows = "".join(
            f"<tr><td><a href='{_href(pilot_id, 'logs', n)}'>"
            f"{html.escape(n)}</a></td><td>{size} bytes</td></tr>" for n, size in files)
        return _page(f"Logs of pilot {pilot_id} at {entry}",
                     f"<table>{rows}</table>" if rows else "<p>This pilot has uploaded no logs.</p>")

    @viewer.api_route("/{entry}/{pilot_id}/logs.json", methods=["GET", "HEAD"])
    def pilot_logs_json(entry: str, pilot_id: str) -> JSONResponse:
        files = guarded(lambda: svc.logs.list(entry, pilot_id))
        return JSONResponse({"entry": entry, "pilot_id": pilot_id,
                             "logs": [{"name": n, "bytes": size} for n, size in files]})

    @viewer.api_route("/{entry}/{pilot_id}/logs/{name}", methods=["GET", "HEAD"])
    def pilot_log(entry: str, pilot_id: str, name: str) -> PlainTextResponse:
        data = guarded(lambda: svc.logs.read(entry, pilot_id, name))
        return PlainTextResponse(data.decode(errors="replace"))

    return viewer
