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
import html
import logging
import time
from urllib.parse import quote
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from airflow_glidein import userdata
from airflow_glidein.bootstrap import keys, tokens
from airflow_glidein.bootstrap.launches import startup_script
from airflow_glidein.bootstrap.logs import LogRefused, LogStore, check_name
from airflow_glidein.config import Config, get_config
from airflow_glidein.state import StateStore, store

log = logging.getLogger(__name__)
FACTORY_DAG = "glidein_factory"
LISTING_TTL = 30.0  # s a launch's provider listing is reused for the next VM of the same batch


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
        self._listings: dict[str, tuple[float, set[str]]] = {}

    @property
    def config(self) -> Config:
        return get_config(self.config_file)

    @property
    def store(self) -> StateStore:
        return store(self.state_url)

    @property
    def logs(self) -> LogStore:
        return LogStore.from_config()  # cheap; follows [glidein] pilot_logs changes

    def in_launch(self, launch: tokens.Launch, pilot_id: str) -> bool:
        """Is ``pilot_id`` listed by the provider under the launch's id? A miss re-lists once."""
        from airflow_glidein.hooks import pilot_hook

        now = time.monotonic()
        seen, ids = self._listings.get(launch.launch_id, (0.0, set()))
        if pilot_id in ids and now - seen < LISTING_TTL:
            return True
        try:
            entry = self.config.entry(launch.entry)
        except StopIteration:
            raise tokens.Refused(403, f"entry {launch.entry} is no longer configured") from None
        try:
            listing = pilot_hook(entry, launch.factory, launch.provision_conn).list_pilots()
        except Exception as exc:
            log.warning("Listing launch %s at %s failed: %s", launch.launch_id, launch.entry, exc)
            raise tokens.Refused(503, f"cannot list launch {launch.launch_id} at its provider now; try again") from None
        ids = {i.id for i in listing if i.launch_id == launch.launch_id}
        self._listings = {k: v for k, v in self._listings.items() if now - v[0] < LISTING_TTL}
        self._listings[launch.launch_id] = (now, ids)
        return pilot_id in ids

    def pilot_secret(self, launch: tokens.Launch) -> str:
        """The launch's pilot credential, read from its Airflow connection ('' when the launch has none)."""
        if not launch.pilot_credential:
            return ""
        from airflow_glidein import secrets

        try:
            secret = secrets.pilot_payload(self.config, launch.pilot_credential)
        except Exception as exc:
            log.warning("Pilot credential %s unavailable: %s", launch.pilot_credential, exc)
            raise tokens.Refused(503, f"pilot credential {launch.pilot_credential} is unavailable now; try again") from None
        return secret

    def handover(self, launch: tokens.Launch, pilot_id: str, upload: str, upload_expires: float, secret: str) -> str:
        cfg = self.config
        entry = cfg.entry(launch.entry)
        p = launch.policy
        to_retire = int(launch.created + p["max_lifetime"])
        fields: dict[str, Any] = {
            "pilot_id": pilot_id,
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


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "send the token as 'Authorization: Bearer <token>'")
    return token.strip()


def _refusal(exc: tokens.Refused | LogRefused) -> PlainTextResponse:
    return PlainTextResponse(f"error={exc}\n", status_code=exc.status)


def create_app(*, ui: bool, config_file: str | None = None, state_url: str | None = None) -> FastAPI:
    """The bootstrap app; ``ui`` adds the authenticated log viewer (needs Airflow's API server)."""
    svc = Service(config_file, state_url)
    app = FastAPI(title="airflow-glidein bootstrap service", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.glidein = svc

    @app.get("/bootstrap/startup.sh")
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

    @app.get("/bootstrap/pubkey.pem")
    def get_pubkey() -> Response:
        return pem(lambda ring: ring.signing.public_key())

    @app.get("/bootstrap/pubkeys/{key_id}.pem")
    def get_pubkey_by_id(key_id: str) -> Response:
        """The current or the previous key by its id: images that pin fingerprints fetch the one an envelope names."""
        return pem(lambda ring: ring.accepted().get(key_id))

    @app.post("/bootstrap/exchange")
    def post_exchange(instance_id: Annotated[str, Query(max_length=255)],
                      authorization: Annotated[str | None, Header()] = None) -> Response:
        token = _bearer(authorization)
        try:
            launch, upload, expires, secret = tokens.exchange(
                svc.store, token, instance_id, time.time(), svc.in_launch, svc.pilot_secret)
        except tokens.Refused as exc:
            log.warning("Exchange for instance %s refused: %s", instance_id, exc)
            return _refusal(exc)
        log.info("Pilot %s of launch %s at %s exchanged its bootstrap token", instance_id, launch.launch_id, launch.entry)
        return PlainTextResponse(svc.handover(launch, instance_id, upload, expires, secret))

    @app.put("/bootstrap/logs/{name:path}")
    async def put_log(name: str, request: Request, instance_id: Annotated[str | None, Query(max_length=255)] = None,
                      authorization: Annotated[str | None, Header()] = None,
                      content_length: Annotated[int | None, Header()] = None) -> Response:
        token = _bearer(authorization)
        try:
            check_name(name)
            entry, pilot_id = await to_thread.run_sync(
                tokens.uploader, svc.store, token, time.time(), instance_id, svc.in_launch)
            size = await svc.logs.write(entry, pilot_id, name, request.stream(), content_length)
        except (tokens.Refused, LogRefused) as exc:
            log.warning("Log upload %r refused: %s", name[:80], exc)
            return _refusal(exc)
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

    @viewer.get("/")
    def pilots_index() -> HTMLResponse:
        rows = "".join(
            f"<tr><td>{html.escape(e)}</td><td><a href='{_href(e, p)}'>"
            f"{html.escape(p)}</a></td></tr>" for e, p in guarded(svc.logs.pilots))
        return _page("Pilot logs", f"<table><tr><th>entry</th><th>pilot</th></tr>{rows}</table>"
                     if rows else "<p>No pilot has uploaded logs yet.</p>")

    @viewer.get("/{entry}/{pilot_id}")
    def pilot_logs(entry: str, pilot_id: str) -> HTMLResponse:
        files = guarded(lambda: svc.logs.list(entry, pilot_id))
        rows = "".join(
            f"<tr><td><a href='{_href(pilot_id, 'logs', n)}'>"
            f"{html.escape(n)}</a></td><td>{size} bytes</td></tr>" for n, size in files)
        return _page(f"Logs of pilot {pilot_id} at {entry}",
                     f"<table>{rows}</table>" if rows else "<p>This pilot has uploaded no logs.</p>")

    @viewer.get("/{entry}/{pilot_id}/logs.json")
    def pilot_logs_json(entry: str, pilot_id: str) -> JSONResponse:
        files = guarded(lambda: svc.logs.list(entry, pilot_id))
        return JSONResponse({"entry": entry, "pilot_id": pilot_id,
                             "logs": [{"name": n, "bytes": size} for n, size in files]})

    @viewer.get("/{entry}/{pilot_id}/logs/{name}")
    def pilot_log(entry: str, pilot_id: str, name: str) -> PlainTextResponse:
        data = guarded(lambda: svc.logs.read(entry, pilot_id, name))
        return PlainTextResponse(data.decode(errors="replace"))

    return viewer
