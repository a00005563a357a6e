"""The Pilots page of the Airflow UI (plugin external view, served by the API server).

What a data-center team asks first: how many pilots per entry and state,
what each frontend asked for and which limit bound it, what the factory
decided, which pilots are stuck or orphaned, and where their logs and the
DAG runs that made them are. Server-side HTML: nothing to build, and it
renders inside the Airflow UI (url_route) or on its own.

Data: the pilot table (state store), the newest ``glidein_requests`` event
per frontend and burst, and the newest ``glidein_status`` event (the
factory's report), read from Airflow's metadata DB, which the API server owns.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any
from urllib.parse import quote, urlparse

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from airflow_glidein import pilotdb, state
from airflow_glidein import pilots as P
from airflow_glidein.assets import GLIDEIN_REQUESTS, GLIDEIN_STATUS
from airflow_glidein.bootstrap.app import _may_read_factory_logs
from airflow_glidein.config import get_config

STATE_ORDER = [P.REQUESTED, P.BOOTING, P.IDLE, P.BUSY, P.RETIRING, P.TERMINATING, P.BOOT_FAILED, P.LOST,
               P.STOPPED, P.STUCK, P.ORPHAN]
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#1f2937}
h2{margin:.2em 0} h3{margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.3em 0} th,td{padding:.25em .8em;border-bottom:1px solid #e5e7eb;text-align:left}
th{background:#f3f4f6} td.n{text-align:right} .bad{color:#b91c1c;font-weight:600} .muted{color:#6b7280}
"""


def _ui_base() -> str:
    """The Airflow UI's path prefix (from [api] base_url), for links to DAG runs."""
    from airflow.sdk import conf

    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def _latest_events(asset: str, limit: int = 500) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra, AssetEvent.timestamp)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == asset)
            .order_by(AssetEvent.timestamp.desc())
            .limit(limit)
        ).all()
    return [{"extra": extra or {}, "timestamp": ts} for extra, ts in rows]


def snapshot() -> dict[str, Any]:
    """Everything the page shows, as data (also served as JSON)."""
    cfg = get_config()
    rows = list(pilotdb.load_pilots(state.store()).values())
    requests: dict[str, dict] = {}
    for ev in _latest_events(GLIDEIN_REQUESTS.name):
        req = ev["extra"]
        key = P.request_key(req.get("frontend"), req.get("burst"))
        if req.get("frontend") and key not in requests:
            requests[key] = {**req, "published": ev["timestamp"].isoformat()}
    status_events = _latest_events(GLIDEIN_STATUS.name, limit=1)
    status = status_events[0]["extra"] if status_events else {}
    counts: dict[str, Counter] = {e.name: Counter() for e in cfg.entries}
    for r in rows:
        counts.setdefault(r["entry"], Counter())[r["state"]] += 1
    return {"factory": cfg.factory.name, "pilots": rows, "counts": {e: dict(c) for e, c in counts.items()},
            "requests": requests, "status": status}


def _a(href: str, text: str, top: bool = False) -> str:
    target = " target='_top'" if top else ""
    return f"<a href='{html.escape(href)}'{target}>{html.escape(text)}</a>"


def _run_link(dag_id: str, run_id: str | None) -> str:
    if not run_id:
        return "<span class='muted'>-</span>"
    return _a(f"{_ui_base()}/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}", run_id, top=True)


def render(data: dict[str, Any]) -> str:
    out = [f"<h2>Pilots of factory {html.escape(data['factory'])}</h2>"]
    states = [s for s in STATE_ORDER if any(c.get(s) for c in data["counts"].values())] or [P.BOOTING, P.IDLE, P.BUSY]
    out.append("<h3>Pilots per entry and state</h3><table><tr><th>entry</th>"
               + "".join(f"<th>{s}</th>" for s in states) + "<th>total</th></tr>")
    for entry, c in sorted(data["counts"].items()):
        out.append(f"<tr><td>{html.escape(entry)}</td>"
                   + "".join(f"<td class='n{' bad' if s in (P.STUCK, P.LOST) and c.get(s) else ''}'>"
                             f"{c.get(s, 0)}</td>" for s in states)
                   + f"<td class='n'>{sum(c.values())}</td></tr>")
    out.append("</table>")

    out.append("<h3>Latest plans</h3>")
    if not data["requests"]:
        out.append("<p class='muted'>No frontend has published a request yet.</p>")
    for key, req in sorted(data["requests"].items()):
        fe = req["frontend"]
        who = f"burst {req['burst']} of {fe}" if req.get("burst") else f"frontend {fe}"
        dag = "glidein_burst" if req.get("burst") else f"glidein_frontend_{fe}"
        out.append(f"<p><b>{html.escape(who)}</b>, published {html.escape(req['published'])} by run "
                   f"{_run_link(dag, req.get('cycle'))}</p><table><tr><th>entry</th><th>idle jobs</th>"
                   "<th>wanted</th><th>level</th><th>max running</th><th>bound by</th></tr>")
        for entry, ask in sorted(req.get("entries", {}).items()):
            why = ask.get("why", {})
            out.append(f"<tr><td>{html.escape(entry)}</td><td class='n'>{why.get('idle_jobs', '-')}</td>"
                       f"<td class='n'>{why.get('wanted', '-')}</td><td class='n'>{ask.get('idle')}</td>"
                       f"<td class='n'>{ask.get('max_running')}</td><td>{html.escape(str(why.get('bound_by', '')))}"
                       "</td></tr>")
        for entry, reason in sorted(req.get("skipped", {}).items()):
            out.append(f"<tr><td>{html.escape(entry)}</td><td colspan='4' class='muted'>skipped</td>"
                       f"<td class='bad'>{html.escape(str(reason))}</td></tr>")
        out.append("</table>")

    status = data["status"]
    if status:
        out.append(f"<h3>Factory's last cycle</h3><p>run {_run_link('glidein_factory', status.get('run_id'))}: "
                   f"{status.get('launched', 0)} launched, "
                   + (", ".join(f"{n} {a}" for a, n in sorted(status.get("actions", {}).items())) or "nothing reaped")
                   + "</p><table><tr><th>entry</th><th>launched</th><th>room</th><th>bound by</th></tr>")
        for entry, d in sorted(status.get("decisions", {}).items()):
            out.append(f"<tr><td>{html.escape(entry)}</td><td class='n'>{d.get('launch', 0)}</td>"
                       f"<td class='n'>{d.get('room', '-')}</td><td>{html.escape(str(d.get('bound_by', '')))}</td></tr>")
        out.append("</table>")
        for entry, b in sorted(status.get("backoff", {}).items()):
            out.append(f"<p class='bad'>Entry {html.escape(entry)} backed off: {html.escape(b.get('reason', ''))}</p>")
        for entry, err in sorted(status.get("errors", {}).items()):
            out.append(f"<p class='bad'>Entry {html.escape(entry)} could not be listed: {html.escape(err)}</p>")

    trouble = [r for r in data["pilots"] if r["state"] in (P.STUCK, P.ORPHAN, P.LOST, P.BOOT_FAILED)]
    out.append("<h3>Stuck, orphan, lost and failed pilots</h3>")
    out.append(_pilot_table(trouble) if trouble else "<p class='muted'>None.</p>")
    out.append("<h3>All pilots</h3>")
    out.append(_pilot_table(data["pilots"]) if data["pilots"] else "<p class='muted'>No pilots.</p>")
    return "".join(out)


def _pilot_table(rows: list[dict[str, Any]]) -> str:
    out = ["<table><tr><th>pilot</th><th>entry</th><th>frontend</th><th>state</th><th>detail</th>"
           "<th>requested by</th><th>launched by</th><th>logs</th></tr>"]
    for r in sorted(rows, key=lambda r: (r["entry"], r["state"], r["id"])):
        fe = r.get("frontend") or "-"
        req_dag = "glidein_burst" if r.get("burst") else f"glidein_frontend_{fe}"
        mem = r.get("memory") or {}
        detail = r.get("detail") or mem.get("terminate_reason") or ""
        if r["state"] == P.STUCK:
            detail = f"{mem.get('terminate_attempts', 0)} terminate attempts; {detail}"
        out.append(
            f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['entry'])}</td><td>{html.escape(fe)}</td>"
            f"<td class='{'bad' if r['state'] in (P.STUCK, P.LOST) else ''}'>{html.escape(r['state'])}</td>"
            f"<td>{html.escape(str(detail))}</td><td>{_run_link(req_dag, r.get('request'))}</td>"
            f"<td>{_run_link('glidein_factory', r.get('factory_run'))}</td>"
            f"<td>{_a('../pilots/' + quote(r['entry'], safe='') + '/' + quote(r['id'], safe=''), 'logs')}</td></tr>")
    out.append("</table>")
    return "".join(out)


def create() -> FastAPI:
    """The page's app; it requires read access to the factory DAG's task logs, like the pilot logs."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(_may_read_factory_logs())])

    @app.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>Glidein pilots</title>"
                            f"<style>{STYLE}</style></head><body>{render(snapshot())}</body></html>")

    @app.get("/data.json")
    def data() -> JSONResponse:
        return JSONResponse(snapshot())

    return app
