"""The Pilots page of the Airflow UI (plugin external view, served by the API server).

What a data-center team asks first: how many pilots per entry and state and
how that moved over the last hours and days, what each frontend asked for
and which limit bound it, what the factory decided, which pilots are stuck
or orphaned, and where their logs and the DAG runs that made them are.
Server-side HTML and SVG: nothing to build, no script, no CDN; it renders
inside the Airflow UI (url_route) or on its own.

At scale every read is bounded: the pilot table is paged by keyset on
(entry, id) (one LIMIT query per page, on an index that also serves each
filter: entry, frontend, state), counts are one GROUP BY in the database,
and the charts read the history table (airflow_glidein.history) by time
range, in buckets. Requests and the factory's status are the newest
``glidein_requests`` / ``glidein_status`` events in Airflow's metadata DB.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import func, select, tuple_

from airflow_glidein import controls, history, state
from airflow_glidein import controls_page as CP
from airflow_glidein import pilots as P
from airflow_glidein.assets import GLIDEIN_REQUESTS, GLIDEIN_STATUS
from airflow_glidein.bootstrap.app import _may_read_factory_logs
from airflow_glidein.config import Config, get_config
from airflow_glidein.pilotdb import PILOTS

STATE_ORDER = [P.REQUESTED, P.BOOTING, P.IDLE, P.BUSY, P.RETIRING, P.TERMINATING, P.BOOT_FAILED, P.LOST,
               P.STOPPED, P.STUCK, P.ORPHAN]
TROUBLE = (P.STUCK, P.ORPHAN, P.LOST, P.BOOT_FAILED)
COLORS = {P.REQUESTED: "#c4b5fd", P.BOOTING: "#93c5fd", P.IDLE: "#fcd34d", P.BUSY: "#34d399",
          P.RETIRING: "#a3a3a3", P.TERMINATING: "#fb923c", P.BOOT_FAILED: "#f87171", P.LOST: "#b91c1c",
          P.STOPPED: "#d6d3d1", P.STUCK: "#7f1d1d", P.ORPHAN: "#e879f9",
          "idle_jobs": "#2563eb", "level": "#16a34a", "max_running": "#9ca3af"}
LABELS = {"idle_jobs": "idle jobs", "level": "requested idle pilots", "max_running": "requested max running"}
# window: (seconds shown, bucket seconds); glideinWMS's pages offer the same spans
RANGES = {"6h": (6 * 3600, 300), "24h": (86400, 900), "7d": (7 * 86400, 3600), "30d": (30 * 86400, 6 * 3600)}
PAGE_SIZE, MAX_PAGE_SIZE, TROUBLE_ROWS = 100, 500, 20
# Each filter of the pilot table is a range scan ending in (entry, id) (its key, and the state and frontend
# indexes of pilotdb.PILOTS): pages cost the same at any depth.
ROW_COLS = ("id", "entry", "frontend", "burst", "state", "detail", "memory", "request", "factory_run", "launched")
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#1f2937}
h2{margin:.2em 0} h3{margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.3em 0} th,td{padding:.25em .8em;border-bottom:1px solid #e5e7eb;text-align:left}
th{background:#f3f4f6} td.n{text-align:right} .bad{color:#b91c1c;font-weight:600} .muted{color:#6b7280}
form.filters{display:flex;gap:.8em;align-items:end;flex-wrap:wrap;margin:.6em 0}
form.filters label{display:flex;flex-direction:column;font-size:.85em;color:#4b5563}
.charts{display:flex;gap:1.5em;flex-wrap:wrap} figure{margin:0} figcaption{font-weight:600;margin:.2em 0}
.legend span{display:inline-block;margin-right:1em;font-size:.85em} .legend i{display:inline-block;width:.8em;
height:.8em;margin-right:.3em;vertical-align:middle} nav.pages a{margin-right:1em}
svg text{font-size:10px;fill:#4b5563} svg .grid{stroke:#e5e7eb}
"""


@dataclass(frozen=True)
class View:
    """What the page shows: filters, chart range and the table's page (a keyset cursor)."""

    entry: str = ""
    frontend: str = ""
    state: str = ""
    range: str = "24h"
    after: tuple[str, str] | None = None  # (entry, id) the page starts after
    before: tuple[str, str] | None = None  # (entry, id) the page ends before (previous page)
    size: int = PAGE_SIZE

    @classmethod
    def from_query(cls, q: Any) -> View:
        def cursor(name: str) -> tuple[str, str] | None:
            e, i = q.get(f"{name}_entry"), q.get(f"{name}_id")
            return (e, i) if e is not None and i is not None else None

        try:
            size = min(max(int(q.get("size") or PAGE_SIZE), 1), MAX_PAGE_SIZE)
        except ValueError:
            size = PAGE_SIZE
        rng = q.get("range") or "24h"
        return cls(q.get("entry") or "", q.get("frontend") or "", q.get("state") or "",
                   rng if rng in RANGES else "24h", cursor("after"), cursor("before"), size)

    def query(self, **changes: Any) -> str:
        """The page's query string with some fields changed (cursors dropped unless given)."""
        v = replace(self, **{"after": None, "before": None, **changes})
        params = {k: getattr(v, k) for k in ("entry", "frontend", "state") if getattr(v, k)}
        if v.range != "24h":
            params["range"] = v.range
        if v.size != PAGE_SIZE:
            params["size"] = v.size
        for name in ("after", "before"):
            if getattr(v, name):
                params[f"{name}_entry"], params[f"{name}_id"] = getattr(v, name)
        return "?" + urlencode(params) if params else "./"


# -- reads ------------------------------------------------------------------------------------

def _filtered(q: Any, view: View) -> Any:
    for col in ("entry", "frontend", "state"):
        if getattr(view, col):
            q = q.where(PILOTS.c[col] == getattr(view, col))
    return q


def page_query(view: View) -> tuple[Any, bool]:
    """The page's query (LIMIT size + 1, to know whether there is more) and whether it reads backwards."""
    def key(cursor: tuple[str, str]) -> tuple[Any, Any]:  # within one entry, the id alone: a range on the index
        return (PILOTS.c.id, cursor[1]) if view.entry else (tuple_(PILOTS.c.entry, PILOTS.c.id), tuple_(*cursor))

    q = _filtered(select(*(PILOTS.c[c] for c in ROW_COLS)), view)
    backwards = view.before is not None and view.after is None
    if backwards:
        col, bound = key(view.before)
        q = q.where(col < bound).order_by(PILOTS.c.entry.desc(), PILOTS.c.id.desc())
    else:
        if view.after:
            col, bound = key(view.after)
            q = q.where(col > bound)
        q = q.order_by(PILOTS.c.entry, PILOTS.c.id)
    return q.limit(view.size + 1), backwards


def pilot_page(store: state.StateStore, view: View) -> dict[str, Any]:
    """One page of pilots in (entry, id) order after / before a cursor: one LIMIT query on an index."""
    q, backwards = page_query(view)
    with store.begin() as conn:
        rows = [dict(r) for r in conn.execute(q).mappings()]
    more = len(rows) > view.size
    rows = rows[: view.size]
    if backwards:
        rows.reverse()
    for r in rows:
        r["memory"] = json.loads(r["memory"]) if isinstance(r.get("memory"), str) else (r.get("memory") or {})
    first = (rows[0]["entry"], rows[0]["id"]) if rows else None
    last = (rows[-1]["entry"], rows[-1]["id"]) if rows else None
    if backwards:  # came from a later page: there is a next one; a previous one if the query had more
        return {"pilots": rows, "prev": first if more else None, "next": last}
    return {"pilots": rows, "prev": first if view.after else None, "next": last if more else None}


def pilot_counts(store: state.StateStore, view: View) -> dict[str, dict[str, int]]:
    """Pilots per entry and state for the filters: one GROUP BY in the database."""
    q = _filtered(select(PILOTS.c.entry, PILOTS.c.state, func.count()), view).group_by(PILOTS.c.entry, PILOTS.c.state)
    out: dict[str, dict[str, int]] = {}
    with store.begin() as conn:
        for entry, st, n in conn.execute(q):
            out.setdefault(entry, {})[st] = n
    return out


def trouble(store: state.StateStore, view: View) -> list[dict[str, Any]]:
    """The first stuck, orphan, lost and failed pilots for the filters (the table's state filter shows all)."""
    out = []
    for st in TROUBLE:
        if view.state and view.state != st:
            continue
        out += pilot_page(store, replace(view, state=st, after=None, before=None, size=TROUBLE_ROWS))["pilots"]
    return out[:TROUBLE_ROWS]


def _latest_events(asset: str, limit: int = 500) -> list[dict[str, Any]]:
    from sqlalchemy import select as sql_select

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            sql_select(AssetEvent.extra, AssetEvent.timestamp)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == asset)
            .order_by(AssetEvent.timestamp.desc())
            .limit(limit)
        ).all()
    return [{"extra": extra or {}, "timestamp": ts} for extra, ts in rows]


def charts(store: state.StateStore, view: View, now: float) -> dict[str, Any]:
    span, bucket = RANGES[view.range]
    since = now - span
    entry, frontend = view.entry or None, view.frontend or None
    pilots = history.series(store, ("pilots",), since, bucket, entry, frontend, by_state=True)
    if view.state:
        pilots = {s: v for s, v in pilots.items() if s == view.state}
    return {"since": since, "until": now, "bucket": bucket,
            "pilots": pilots, "times": history.sample_times(store, since, bucket, by_state=True),
            "requests": history.series(store, history.REQUEST_KINDS, since, bucket, entry, frontend),
            "request_times": history.sample_times(store, since, bucket, by_state=False, frontend=frontend)}


def snapshot(view: View | None = None, now: float | None = None) -> dict[str, Any]:
    """Everything the page shows, as data (also served as JSON)."""
    view = view or View()
    status_events = _latest_events(GLIDEIN_STATUS.name, limit=1)
    return gather(get_config(), state.store(), view, time.time() if now is None else now,
                  _latest_events(GLIDEIN_REQUESTS.name), status_events[0]["extra"] if status_events else {})


def gather(cfg: Config, store: state.StateStore, view: View, now: float, request_events: list[dict[str, Any]],
           status: dict[str, Any]) -> dict[str, Any]:
    """The page's data from the state store, given the newest request events and the factory's status."""
    requests: dict[str, dict] = {}
    for ev in request_events:
        req = ev["extra"]
        key = P.request_key(req.get("frontend"), req.get("burst"))
        if req.get("frontend") and key not in requests and (not view.frontend or req["frontend"] == view.frontend):
            requests[key] = {**req, "published": ev["timestamp"].isoformat()}
    counts = pilot_counts(store, view)
    if not (view.entry or view.frontend or view.state):
        for e in cfg.entries:
            counts.setdefault(e.name, {})
    return {"factory": cfg.factory.name, "view": view, "counts": counts, "now": now,
            "downtimes": controls.load(store, now), "actions": controls.recent(store),
            "entries": sorted({e.name for e in cfg.entries} | set(counts)),
            "frontends": sorted(f.name for f in cfg.frontends),
            "page": pilot_page(store, view), "trouble": trouble(store, view),
            "requests": requests, "status": status, "charts": charts(store, view, now)}


# -- rendering ---------------------------------------------------------------------------------


def _a(href: str, text: str, top: bool = False) -> str:
    target = " target='_top'" if top else ""
    return f"<a href='{html.escape(href)}'{target}>{html.escape(text)}</a>"


@lru_cache(maxsize=1)
def _ui_base() -> str:
    """The Airflow UI's path prefix (from [api] base_url), for links to DAG runs."""
    from airflow.sdk import conf

    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def _run_link(dag_id: str, run_id: str | None) -> str:
    if not run_id:
        return "<span class='muted'>-</span>"
    return _a(f"{_ui_base()}/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}", run_id, top=True)


def _select(name: str, label: str, options: list[str], current: str) -> str:
    opts = "".join(f"<option value='{html.escape(o)}'{' selected' if o == current else ''}>{html.escape(o or 'all')}"
                   "</option>" for o in ["", *options])
    return f"<label>{label}<select name='{name}'>{opts}</select></label>"


def _filters(data: dict[str, Any]) -> str:
    v: View = data["view"]
    ranges = "".join(f"<option{' selected' if r == v.range else ''}>{r}</option>" for r in RANGES)
    return ("<form class='filters' method='get' action='./'>"
            + _select("entry", "entry", data["entries"], v.entry)
            + _select("frontend", "frontend", data["frontends"], v.frontend)
            + _select("state", "state", STATE_ORDER, v.state)
            + f"<label>charts over<select name='range'>{ranges}</select></label>"
            + "<button type='submit'>Show</button>"
            + (f" {_a('./', 'clear')}" if (v.entry or v.frontend or v.state) else "") + "</form>")


def render(data: dict[str, Any]) -> str:
    view: View = data.get("view") or View()
    out = [f"<h2>Pilots of factory {html.escape(data['factory'])}</h2>", _filters(data)]
    out.append(CP.render_controls(data))
    out.append(_render_charts(data["charts"], view))
    states = [s for s in STATE_ORDER if any(c.get(s) for c in data["counts"].values())] or [P.BOOTING, P.IDLE, P.BUSY]
    out.append("<h3>Pilots per entry and state</h3><table><tr><th>entry</th>"
               + "".join(f"<th>{s}</th>" for s in states) + "<th>total</th><th>all its pilots</th></tr>")
    for entry, c in sorted(data["counts"].items()):
        out.append(f"<tr><td>{_a(view.query(entry=entry), entry)}</td>"
                   + "".join(f"<td class='n{' bad' if s in (P.STUCK, P.LOST) and c.get(s) else ''}'>"
                             f"{c.get(s, 0)}</td>" for s in states)
                   + f"<td class='n'>{sum(c.values())}</td>" + CP.entry_links(entry) + "</tr>")
    out.append("</table>")
    out += _render_requests(data["requests"])
    out += _render_status(data["status"])
    out.append("<h3>Stuck, orphan, lost and failed pilots</h3>")
    bad = {s: sum(c.get(s, 0) for c in data["counts"].values()) for s in TROUBLE}
    if sum(bad.values()) > len(data["trouble"]):  # the first few here; each state's link filters the table
        out.append(f"<p>The first {len(data['trouble'])} of "
                   + ", ".join(_a(view.query(state=s), f"{n} {s}") for s, n in bad.items() if n) + "</p>")
    out.append(_pilot_table(data["trouble"]) if data["trouble"] else "<p class='muted'>None.</p>")
    total = sum(sum(c.values()) for c in data["counts"].values())
    filtered = view.entry or view.frontend or view.state
    out.append(f"<h3>All pilots <span class='muted'>({total}{' matching' if filtered else ''})</span></h3>")
    out.append(CP.render_pilot_form())
    page = data["page"]
    out.append(_pages(view, page))
    out.append(_pilot_table(page["pilots"]) if page["pilots"] else "<p class='muted'>No pilots.</p>")
    out.append(_pages(view, page))
    out.append(CP.render_history(data.get("actions", [])))
    return "".join(out)


def _pages(view: View, page: dict[str, Any]) -> str:
    links = [_a(view.query(), "first")] if view.after or view.before else []
    if page["prev"]:
        links.append(_a(view.query(before=page["prev"]), "previous"))
    if page["next"]:
        links.append(_a(view.query(after=page["next"]), "next"))
    return "<nav class='pages'>" + "".join(links) + "</nav>"


def _render_requests(requests: dict[str, dict]) -> list[str]:
    out = ["<h3>Latest plans</h3>"]
    if not requests:
        out.append("<p class='muted'>No frontend has published a request yet.</p>")
    for _key, req in sorted(requests.items()):
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
    return out


def _render_status(status: dict[str, Any]) -> list[str]:
    if not status:
        return []
    out = [f"<h3>Factory's last cycle</h3><p>run {_run_link('glidein_factory', status.get('run_id'))}: "
           f"{status.get('launched', 0)} launched, "
           + (", ".join(f"{n} {a}" for a, n in sorted(status.get("actions", {}).items())) or "nothing reaped")
           + "</p><table><tr><th>entry</th><th>launched</th><th>room</th><th>bound by</th></tr>"]
    for entry, d in sorted(status.get("decisions", {}).items()):
        out.append(f"<tr><td>{html.escape(entry)}</td><td class='n'>{d.get('launch', 0)}</td>"
                   f"<td class='n'>{d.get('room', '-')}</td><td>{html.escape(str(d.get('bound_by', '')))}</td></tr>")
    out.append("</table>")
    for entry, b in sorted(status.get("backoff", {}).items()):
        out.append(f"<p class='bad'>Entry {html.escape(entry)} backed off: {html.escape(b.get('reason', ''))}</p>")
    for entry, err in sorted(status.get("errors", {}).items()):
        out.append(f"<p class='bad'>Entry {html.escape(entry)} could not be listed: {html.escape(err)}</p>")
    return out


def _pilot_table(rows: list[dict[str, Any]]) -> str:
    out = ["<table class='pilots'><tr><th></th><th>pilot</th><th>entry</th><th>frontend</th><th>state</th>"
           "<th>launched</th><th>detail</th><th>requested by</th><th>launched by</th><th>logs</th></tr>"]
    for r in rows:
        fe = r.get("frontend") or "-"
        req_dag = "glidein_burst" if r.get("burst") else f"glidein_frontend_{fe}"
        mem = r.get("memory") or {}
        detail = r.get("detail") or mem.get("terminate_reason") or ""
        if r["state"] == P.STUCK:
            detail = f"{mem.get('terminate_attempts', 0)} terminate attempts; {detail}"
        launched = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["launched"])) if r.get("launched") else "-"
        out.append(
            f"<tr>{CP.checkbox(r)}<td>{html.escape(r['id'])}</td><td>{html.escape(r['entry'])}</td>"
            f"<td>{html.escape(fe)}</td>"
            f"<td class='{'bad' if r['state'] in (P.STUCK, P.LOST) else ''}'>{html.escape(r['state'])}</td>"
            f"<td>{launched}</td><td>{html.escape(str(detail))}</td><td>{_run_link(req_dag, r.get('request'))}</td>"
            f"<td>{_run_link('glidein_factory', r.get('factory_run'))}</td>"
            f"<td>{_a('../pilots/' + quote(r['entry'], safe='') + '/' + quote(r['id'], safe=''), 'logs')}</td></tr>")
    out.append("</table>")
    return "".join(out)


# -- charts (inline SVG) -----------------------------------------------------------------------

W, H, LEFT, BOTTOM, TOP = 660, 220, 44, 22, 8


def _render_charts(c: dict[str, Any], view: View) -> str:
    scope = " at ".join(x for x in (view.frontend and f"frontend {view.frontend}", view.entry and view.entry) if x)
    span = f"last {view.range}" + (f", {scope}" if scope else "")
    if not c["times"] and not c["request_times"]:
        return ("<h3>Over time</h3><p class='muted'>No history yet: each factory report and each published frontend "
                "request adds a sample.</p>")
    pilots = _svg("Pilots by state", c["times"], c["pilots"], [s for s in STATE_ORDER if s in c["pilots"]],
                  c["since"], c["until"], stacked=True)
    requests = _svg("Idle jobs and requested pilots", c["request_times"], c["requests"],
                    [k for k in history.REQUEST_KINDS if k in c["requests"]], c["since"], c["until"], stacked=False)
    return f"<h3>Over time <span class='muted'>({html.escape(span)}, UTC)</span></h3><div class='charts'>" \
           f"{pilots}{requests}</div>"


def _svg(title: str, times: list[float], data: dict[str, dict[float, float]], names: list[str], since: float,
         until: float, stacked: bool) -> str:
    """A time chart: stacked areas (counts by state) or lines, axes in UTC, a legend with the latest values."""
    pw, ph = W - LEFT - 28, H - BOTTOM - TOP
    base = {t: 0.0 for t in times}
    tops = []
    for name in names:
        top = {t: base[t] + data[name].get(t, 0.0) for t in times} if stacked else {t: data[name].get(t, 0.0)
                                                                                   for t in times}
        tops.append((name, dict(base) if stacked else None, top))
        if stacked:
            base = top
    ymax = max([v for _, _, top in tops for v in top.values()] + [1.0])
    ymax = _nice(ymax)

    def x(t: float) -> float:
        return LEFT + (t - since) / max(until - since, 1) * pw

    def y(v: float) -> float:
        return TOP + ph - v / ymax * ph

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' role='img' "
             f"aria-label='{html.escape(title)}'>"]
    for i in range(5):
        v = ymax * i / 4
        parts.append(f"<line class='grid' x1='{LEFT}' x2='{LEFT + pw}' y1='{y(v):.1f}' y2='{y(v):.1f}'/>"
                     f"<text x='{LEFT - 4}' y='{y(v) + 3:.1f}' text-anchor='end'>{v:g}</text>")
    for i in range(5):
        t = since + (until - since) * i / 4
        fmt = "%H:%M" if until - since <= 86400 else "%m-%d %H:%M"
        parts.append(f"<text x='{x(t):.1f}' y='{H - 6}' text-anchor='middle'>{time.strftime(fmt, time.gmtime(t))}"
                     "</text>")
    for name, low, top in tops:
        color = COLORS.get(name, "#6b7280")
        pts = " ".join(f"{x(t):.1f},{y(top[t]):.1f}" for t in times)
        label = html.escape(LABELS.get(name, name))
        tip = f"<title>{label}: latest {top[times[-1]] - (low[times[-1]] if low else 0):g}</title>" if times else ""
        if stacked and times:
            back = " ".join(f"{x(t):.1f},{y(low[t]):.1f}" for t in reversed(times))
            parts.append(f"<polygon class='series' data-series='{html.escape(name)}' points='{pts} {back}' "
                         f"fill='{color}' stroke='{color}'>{tip}</polygon>")
        elif times:
            dash = " stroke-dasharray='4 3'" if name == "max_running" else ""
            parts.append(f"<polyline class='series' data-series='{html.escape(name)}' points='{pts}' fill='none' "
                         f"stroke='{color}' stroke-width='2'{dash}>{tip}</polyline>")
    parts.append("</svg>")
    legend = "".join(f"<span><i style='background:{COLORS.get(n, '#6b7280')}'></i>{html.escape(LABELS.get(n, n))} "
                     f"{_latest(data[n], times):g}</span>" for n in names)
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}" \
           f"<div class='legend'>{legend or '<span class=muted>nothing in this range</span>'}</div></figure>"


def _latest(values: dict[float, float], times: list[float]) -> float:
    return round(values.get(times[-1], 0.0), 1) if times else 0.0


def _nice(v: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten at or above v."""
    scale = 10 ** len(str(int(v))) / 10
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= v)


# -- the app -----------------------------------------------------------------------------------


def create() -> FastAPI:
    """The page's app; it requires read access to the factory DAG's task logs, like the pilot logs."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(_may_read_factory_logs())])

    @app.get("/")
    def page(request: Request) -> HTMLResponse:
        body = render(snapshot(View.from_query(request.query_params)))
        return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>Glidein pilots</title>"
                            f"<style>{STYLE}</style></head><body>{body}</body></html>")

    @app.get("/data.json")
    def data(request: Request, parts: str = "") -> JSONResponse:
        """The page as JSON; ``parts=page``: only the table's page (a script paging through every pilot)."""
        view = View.from_query(request.query_params)
        if parts == "page":
            out = {"factory": get_config().factory.name, "page": pilot_page(state.store(), view)}
        else:
            out = snapshot(view)
        out["view"] = asdict(view)
        return JSONResponse(json.loads(json.dumps(out, default=_plain)))

    CP.add_routes(app)
    return app


def _plain(x: Any) -> Any:
    return asdict(x) if hasattr(x, "__dataclass_fields__") else str(x)
