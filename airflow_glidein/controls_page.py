"""The Pilots page's operator controls: downtimes, stops and pilot actions (forms, routes, checks).

Every change is a POST that passes three checks before it touches anything:
the user may edit the factory DAG, or the DAG of the frontend whose pilots
or scope it is (through Airflow's auth manager, as the page's reads are
checked); the request comes from the page's own origin (Sec-Fetch-Site and
Origin; a request with neither must carry a bearer token, which a cross-site
form cannot); and it gives a reason. It is then recorded (who, when, what,
why), shown in the page's history, and a factory run is triggered. Pilot
actions only mark pilots: the factory's reap retires or terminates them on
its verified path, never the API server.
"""

from __future__ import annotations

import html
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select

from airflow_glidein import controls as C
from airflow_glidein import pilots as P
from airflow_glidein import state
from airflow_glidein.config import get_config
from airflow_glidein.pilotdb import PILOTS

FACTORY_DAG = "glidein_factory"
MAX_FORM = 256 * 1024  # bytes of a form (a page of selected pilots is far less)
GONE = (P.TERMINATED,)


def frontend_dag(frontend: str) -> str:
    return f"glidein_frontend_{frontend}"


# -- checks ---------------------------------------------------------------------------------------

def may_edit(user: Any, frontends: set[str | None], auth: Any = None) -> bool:
    """Edit on the factory DAG covers everything; else edit on each frontend's DAG covers its pilots and
    scopes (a pilot or scope of no frontend needs the factory's)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    if auth is None:
        from airflow.api_fastapi.app import get_auth_manager

        auth = get_auth_manager()

    def edit(dag: str) -> bool:
        return auth.is_authorized_dag(method="PUT", details=DagDetails(id=dag), user=user)

    if edit(FACTORY_DAG):
        return True
    return bool(frontends) and None not in frontends and all(edit(frontend_dag(f)) for f in frontends)


def cross_site(request: Request) -> str | None:
    """Why the request may come from another site (None: it comes from the page's own origin)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site!r}"
    origin = request.headers.get("origin")
    if origin is None:
        if site is None and not request.headers.get("authorization", "").lower().startswith("bearer "):
            return "no Origin header (a browser sends one; a script authenticates with a bearer token)"
        return None
    if origin not in own_origins(request):
        return f"Origin {origin!r} is not this server's"
    return None


def own_origins(request: Request) -> set[str]:
    from airflow.sdk import conf

    h = request.headers
    out = {f"{request.url.scheme}://{h.get('host', '')}"}
    if h.get("x-forwarded-host"):
        out.add(f"{h.get('x-forwarded-proto', request.url.scheme)}://{h['x-forwarded-host'].split(',')[0].strip()}")
    base = urlparse(conf.get("api", "base_url", fallback="") or "")
    if base.scheme and base.netloc:
        out.add(f"{base.scheme}://{base.netloc}")
    return out


async def form(request: Request) -> dict[str, list[str]]:
    body = await request.body()
    if len(body) > MAX_FORM:
        raise HTTPException(413, "form too large")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def one(f: dict[str, list[str]], name: str) -> str:
    return (f.get(name) or [""])[0].strip()


# -- the factory run ------------------------------------------------------------------------------

def trigger_factory(who: str, what: str) -> str:
    """Queue a factory run for an operator's action; the outcome, as the history shows it."""
    try:
        from airflow.api.common.trigger_dag import trigger_dag
        from airflow.utils.types import DagRunTriggeredByType

        run = trigger_dag(FACTORY_DAG, triggered_by=DagRunTriggeredByType.UI, triggering_user_name=who,
                          run_id=f"manual__glidein_{time.strftime('%Y%m%dT%H%M%S')}_{time.monotonic_ns() % 10**6}",
                          note=f"{what} (by {who}, from the Pilots page)")
        return f"factory run {run.run_id} triggered" if run else "factory run not triggered"
    except Exception as exc:  # the DAG paused or not parsed yet: the next scheduled cycle applies it
        return f"factory run not triggered ({type(exc).__name__}: {str(exc)[:200]}); the next cycle applies it"


# -- reads ----------------------------------------------------------------------------------------

def entry_pilots(store: state.StateStore, entry: str) -> list[dict[str, Any]]:
    """An entry's pilots not yet gone (what "all of an entry's pilots" means)."""
    with store.begin() as conn:
        return [dict(r) for r in conn.execute(select(PILOTS.c.id, PILOTS.c.frontend).where(
            PILOTS.c.entry == entry, PILOTS.c.state.notin_(GONE))).mappings()]


def count_entry_pilots(store: state.StateStore, entry: str) -> int:
    with store.begin() as conn:
        return conn.execute(select(func.count()).select_from(PILOTS).where(
            PILOTS.c.entry == entry, PILOTS.c.state.notin_(GONE))).scalar_one()


def frontends_of(store: state.StateStore, entry: str, ids: list[str]) -> dict[str, str | None]:
    with store.begin() as conn:
        rows = conn.execute(select(PILOTS.c.id, PILOTS.c.frontend).where(PILOTS.c.entry == entry,
                                                                          PILOTS.c.id.in_(ids)))
        return {i: f for i, f in rows}


# -- rendering ------------------------------------------------------------------------------------

def _e(x: Any) -> str:
    return html.escape(str(x))


def _options(names: list[str], every: str) -> str:
    return f"<option value=''>{every}</option>" + "".join(f"<option>{_e(n)}</option>" for n in names)


def render_controls(data: dict[str, Any]) -> str:
    """Downtimes and stops in effect or scheduled (each with its End button), and the forms to add them."""
    now = data.get("now", time.time())
    out = ["<h3>Operator controls</h3>"]
    held = data.get("downtimes", [])
    if held:
        out.append("<table class='controls'><tr><th>#</th><th>what</th><th>scope</th><th>window (UTC)</th>"
                   "<th>pilots</th><th>why</th><th>by</th><th></th></tr>")
        for d in held:
            status = "in effect" if d.active(now) else "scheduled"
            button = "Resume" if d.kind == C.STOP else "End" if d.active(now) else "Cancel"
            out.append(
                f"<tr class='{'bad' if d.active(now) else ''}'><td>{d.id}</td><td>{_e(d.kind)} ({status})</td>"
                f"<td>{_e(d.scope)}</td><td>{C.iso(d.start)} .. {C.iso(d.end) if d.end else 'until ended'}</td>"
                f"<td>{'drained' if d.drain else 'keep running'}</td><td>{_e(d.reason)}</td><td>{_e(d.who)}</td>"
                f"<td><form method='post' action='downtimes/{d.id}/end'><button>{button}</button></form></td></tr>")
        out.append("</table>")
    else:
        out.append("<p class='muted'>No downtime or stop: every entry launches.</p>")
    entries, frontends = _options(data["entries"], "every entry"), _options(data["frontends"], "every frontend")
    out.append(
        "<form class='filters' method='post' action='downtimes'><input type='hidden' name='kind' value='stop'>"
        f"<label>stop launches at<select name='entry'>{entries}</select></label>"
        f"<label>for<select name='frontend'>{frontends}</select></label>"
        "<label>reason<input name='reason' required size='30'></label>"
        "<button type='submit'>Stop launches</button></form>"
        "<form class='filters' method='post' action='downtimes'><input type='hidden' name='kind' value='downtime'>"
        f"<label>downtime at<select name='entry'>{entries}</select></label>"
        f"<label>for<select name='frontend'>{frontends}</select></label>"
        "<label>start (UTC)<input name='start' value='now' size='16'></label>"
        "<label>end (UTC; empty: until ended)<input name='end' placeholder='+2h or 2026-12-05T06:00' size='20'></label>"
        "<label>reason<input name='reason' required size='30'></label>"
        "<label>pilots<select name='drain'><option value=''>keep running</option>"
        "<option value='1'>drain (retire)</option></select></label>"
        "<button type='submit'>Add downtime</button></form>")
    return "".join(out)


def render_pilot_form() -> str:
    """The form the pilot tables' checkboxes belong to (form='pilot-actions')."""
    return ("<form id='pilot-actions' class='filters' method='post' action='pilots'>"
            "<label>selected pilots: reason<input name='reason' required size='30'></label>"
            "<button type='submit' name='action' value='retire'>Retire (drain) selected</button>"
            "<button type='submit' name='action' value='terminate'>Terminate selected</button></form>")


def checkbox(r: dict[str, Any]) -> str:
    return (f"<td><input type='checkbox' form='pilot-actions' name='pilot' "
            f"value='{_e(r['entry'])}/{_e(r['id'])}' aria-label='select {_e(r['id'])}'></td>")


def entry_links(entry: str) -> str:
    q = lambda a: "confirm?" + urlencode({"entry": entry, "action": a})  # noqa: E731
    return (f"<td><a href='{_e(q('retire'))}'>retire all</a> <a href='{_e(q('terminate'))}'>terminate all</a></td>")


def render_history(actions: list[dict[str, Any]]) -> str:
    out = ["<h3>Operator actions <span class='muted'>(newest first)</span></h3>"]
    if not actions:
        return out[0] + "<p class='muted'>None yet.</p>"
    out.append("<table class='history'><tr><th>when (UTC)</th><th>who</th><th>what</th><th>where</th><th>why</th>"
               "<th>outcome</th></tr>")
    for a in actions:
        pilots = a["pilots"]
        what = f"{a['action']} {len(pilots)} pilot{'s' if len(pilots) != 1 else ''}" if pilots is not None \
            else a["action"]
        where = C.scope_name(a["entry"], a["frontend"])
        if pilots is not None and len(pilots) <= 5:
            where += ": " + ", ".join(pilots)
        status = ("carried out" if a["done"] else "pending") if pilots is not None else ""
        out.append(f"<tr><td>{C.iso(a['at'])}</td><td>{_e(a['who'])}</td><td>{_e(what)}</td><td>{_e(where)}</td>"
                   f"<td>{_e(a['reason'])}</td><td>{_e('; '.join(x for x in (status, a['outcome']) if x))}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _page(title: str, body: str, status: int = 200, back: str = "./") -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title></head>"
                        f"<body style='font-family:system-ui,sans-serif;margin:1.2em'><h2>{_e(title)}</h2>{body}"
                        f"<p><a href='{back}'>Back to the Pilots page</a></p></body></html>", status_code=status)


# -- routes ---------------------------------------------------------------------------------------

def add_routes(app: FastAPI) -> None:
    from airflow.api_fastapi.core_api.security import get_user

    def check(request: Request, user: Any, frontends: set[str | None]) -> str:
        if why := cross_site(request):
            raise HTTPException(403, f"refused: this request may come from another site ({why})")
        if not may_edit(user, frontends):
            need = " or ".join([FACTORY_DAG] + [frontend_dag(f) for f in sorted(x for x in frontends if x)])
            raise HTTPException(403, f"refused: this needs edit permission on the DAG {need}")
        return user.get_name()

    @app.get("/confirm")
    def confirm(entry: str, action: str) -> HTMLResponse:
        """The count an operator confirms before acting on all of an entry's pilots."""
        if action not in C.PILOT_ACTIONS:
            raise HTTPException(400, f"action {action!r}: only {' or '.join(C.PILOT_ACTIONS)}")
        n = count_entry_pilots(state.store(), entry)
        verb = "Retire (drain)" if action == C.RETIRE else "Terminate"
        if n == 0:
            return _page("Nothing to do", f"<p>Entry {_e(entry)} has no pilots.</p>")
        return _page(f"{verb} all {n} pilots of entry {entry}?", (
            f"<p>{verb} <b>all {n} pilots</b> of entry <b>{_e(entry)}</b>. "
            + ("Their startds stop accepting jobs; running jobs finish." if action == C.RETIRE else
               "Running jobs are killed.") + " The factory's next run carries it out.</p>"
            f"<form method='post' action='pilots'><input type='hidden' name='entry' value='{_e(entry)}'>"
            f"<input type='hidden' name='count' value='{n}'><input type='hidden' name='action' value='{action}'>"
            "<label>reason <input name='reason' required size='40'></label> "
            f"<button type='submit'>{verb} {n} pilots</button></form>"))

    @app.post("/pilots")
    async def act_on_pilots(request: Request, user: Any = Depends(get_user)) -> HTMLResponse:  # noqa: B008
        f, store, now = await form(request), state.store(), time.time()
        action, reason = one(f, "action"), one(f, "reason")
        targets: dict[str, dict[str, str | None]] = {}  # entry -> {pilot id: its frontend}
        whole = one(f, "entry")
        if whole:
            targets[whole] = {r["id"]: r["frontend"] for r in entry_pilots(store, whole)}
        for value in f.get("pilot", []):
            entry, _, pid = value.partition("/")
            targets.setdefault(entry, {})[pid] = None
        for entry, pilots in targets.items():  # their frontends from the table, never from the form
            pilots.update(frontends_of(store, entry, list(pilots)))
        who = check(request, user, {fe for p in targets.values() for fe in p.values()} or {None})
        if whole and str(len(targets[whole])) != one(f, "count"):
            return _page("Not done: the count changed", f"<p>Entry {_e(whole)} now has {len(targets[whole])} pilots, "
                         f"not the {_e(one(f, 'count'))} confirmed. <a href='confirm?"
                         f"{_e(urlencode({'entry': whole, 'action': action}))}'>Confirm again</a>.</p>", 409)
        if not any(targets.values()):
            raise HTTPException(400, "no pilot selected")
        try:
            ids = [C.request_pilots(store, action, entry, list(p), reason, who, now)
                   for entry, p in targets.items() if p]
        except C.ControlError as exc:
            raise HTTPException(400, str(exc)) from None
        n = sum(len(p) for p in targets.values())
        what = f"{action} {n} pilot{'s' if n != 1 else ''} at {', '.join(sorted(targets))}: {reason}"
        outcome = trigger_factory(who, what)
        for aid in ids:
            C.note_outcome(store, aid, outcome)
        return _page("Requested", f"<p>{_e(what)}, by {_e(who)}. {_e(outcome)}: its reap carries it out and the "
                     "page's history shows when.</p>")

    @app.post("/downtimes")
    async def add_downtime(request: Request, user: Any = Depends(get_user)) -> HTMLResponse:  # noqa: B008
        f, now, cfg = await form(request), time.time(), get_config()
        kind, entry, frontend = one(f, "kind"), one(f, "entry"), one(f, "frontend")
        who = check(request, user, {frontend} if frontend else {None})
        if kind not in (C.DOWNTIME, C.STOP):
            raise HTTPException(400, f"kind {kind!r}: only downtime or stop")
        try:
            C.check_scope(entry, frontend, [e.name for e in cfg.entries], [x.name for x in cfg.frontends])
            start = (C.parse_time(one(f, "start"), now, "start") or now) if kind == C.DOWNTIME else now
            end = C.parse_time(one(f, "end"), now, "end") if kind == C.DOWNTIME else None
            did = C.add(state.store(), kind, entry, frontend, start, end, one(f, "reason"), who, now,
                        drain=kind == C.DOWNTIME and bool(one(f, "drain")))
        except C.ControlError as exc:
            return _page("Not done", f"<p class='bad'>{_e(exc)}</p>", 400)
        scope = C.scope_name(entry, frontend)
        outcome = trigger_factory(who, f"{kind} #{did} on {scope}")
        return _page("Recorded", f"<p>{_e(kind)} #{did} on {_e(scope)}, by {_e(who)}. {_e(outcome)}.</p>")

    @app.post("/downtimes/{did}/end")
    def end_downtime(did: int, request: Request, user: Any = Depends(get_user)) -> HTMLResponse:  # noqa: B008
        now, store = time.time(), state.store()
        d = next((x for x in C.load(store, now) if x.id == did), None)
        if d is None:
            raise HTTPException(404, f"no downtime or stop #{did} in effect or scheduled")
        who = check(request, user, {d.frontend} if d.frontend else {None})
        C.end(store, did, who, now)
        outcome = trigger_factory(who, f"ended {d.kind} #{did} on {d.scope}")
        return _page("Ended", f"<p>{_e(d.kind)} #{did} on {_e(d.scope)} ended by {_e(who)}. {_e(outcome)}.</p>",
                     back="../../")
