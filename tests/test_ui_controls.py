"""Operator controls on the Pilots page, through Airflow's real API server (our plugin at /glidein).

A terminate from the page in headless Chromium (Debian's, driven by Playwright, as tests/test_ui_browser.py)
ends with the pilot gone through the factory's own cycle; a user without edit permission, or a request
from another site, is refused and nothing is recorded. Screenshots go to test-output/.
"""

from __future__ import annotations

import html
import time

import httpx
import pytest

from airflow_glidein import controls, state
from tests.helpers import example_config, run_dag, task_states, write_config, xcom
from tests.test_ui_browser import CHROMIUM, OUT, browser_page  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("airflow_db")
EAST, WEST = "aws-us-east-1", "aws-us-west-2"


def headers(server, username: str = "admin", role: str = "admin", **extra: str) -> dict[str, str]:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))
    return {"Authorization": f"Bearer {token}", **extra}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_terminate_from_the_page_goes_through_the_factory_cycle(ec2, tmp_path, monkeypatch, bootstrap_server,
                                                                browser_page):  # noqa: F811
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=1, verify_poll=1)
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    run_dag("glidein_factory")  # the second cycle's inventory puts the launched pilots in the table
    east = sorted(i["InstanceId"] for i in ec2.instances("us-east-1"))
    assert len(east) == 10
    victim = east[3]
    OUT.mkdir(exist_ok=True)
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    page = browser_page
    page.goto(f"{bootstrap_server.url}/glidein/dashboard/?entry={EAST}")
    page.wait_for_selector("text=Operator controls")
    page.check(f"input[name=pilot][value='{EAST}/{victim}']")
    page.fill("#pilot-actions input[name=reason]", "stuck job, user asked")
    page.get_by_role("button", name="Terminate selected").click()
    page.wait_for_selector("text=Requested")
    done = page.inner_text("body")
    assert f"terminate 1 pilot at {EAST}: stuck job, user asked, by admin" in done
    assert "factory run manual__glidein_" in done and "triggered" in done
    with create_session() as session:  # queued for the scheduler, in the user's name
        (queued,) = session.scalars(select(DagRun).where(DagRun.dag_id == "glidein_factory",
                                                         DagRun.run_id.like("manual__glidein_%"))).all()
        assert (queued.triggering_user_name, str(queued.state)) == ("admin", "queued")
    assert ec2.instances("us-east-1") and victim in {i["InstanceId"] for i in ec2.instances("us-east-1")}

    # the factory's cycle carries it out: the reap terminates, verify_terminations sees it gone
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    reaped = [a for a in xcom(fa, "plan_cycle", key="actions") if a["id"] == victim]
    assert reaped == [{"id": victim, "entry": EAST, "action": "terminate",
                       "reason": "terminated by admin: stuck job, user asked"}]
    live = {i["InstanceId"] for i in ec2.instances("us-east-1")}
    assert victim not in live and set(east) - {victim} <= live  # the others run on (the demand may add one)
    assert victim in {i["InstanceId"] for i in ec2.instances("us-east-1", live_only=False)}  # terminated, not lost
    run_dag("glidein_factory")  # the next cycle no longer lists it: the request is settled

    page.goto(f"{bootstrap_server.url}/glidein/dashboard/")
    history = page.locator("table.history").inner_text()
    assert "terminate 1 pilot" in history and victim in history and "carried out" in history and "admin" in history
    assert victim not in page.locator("table.pilots").last.inner_text()

    # all of an entry's pilots: the confirmation states the count
    page.goto(f"{bootstrap_server.url}/glidein/dashboard/")
    page.locator("tr", has_text=WEST).first.get_by_text("terminate all").click()
    page.wait_for_selector(f"text=Terminate all 5 pilots of entry {WEST}?")
    assert page.get_by_role("button", name="Terminate 5 pilots").count() == 1

    # a stop from the page, shown in effect, then resumed
    page.goto(f"{bootstrap_server.url}/glidein/dashboard/")
    stop = page.locator("form", has=page.get_by_role("button", name="Stop launches"))
    stop.locator("select[name=entry]").select_option(WEST)
    stop.locator("input[name=reason]").fill("provider incident")
    stop.get_by_role("button", name="Stop launches").click()
    page.wait_for_selector("text=Recorded")
    assert controls.launch_hold(state.store(), WEST, "cms") == "stopped: provider incident"
    page.goto(f"{bootstrap_server.url}/glidein/dashboard/")
    assert "stop (in effect)" in page.locator("table.controls").inner_text()
    page.screenshot(path=str(OUT / "pilots-page-controls.png"), full_page=True)
    page.get_by_role("button", name="Resume").click()
    page.wait_for_selector("text=Ended")
    assert controls.launch_hold(state.store(), WEST, "cms") is None


def _pilots(now: float) -> list[dict]:
    from bench.bench_pilots_page import fill_pilots

    return fill_pilots(state.store(), 8, [EAST], ["cms", "atlas"], now)


def test_without_edit_permission_or_from_another_site_nothing_is_done(tmp_path, monkeypatch, bootstrap_server):
    write_config(tmp_path, example_config(), monkeypatch)
    rows = _pilots(time.time())
    url = f"{bootstrap_server.url}/glidein/dashboard"
    same = {"Origin": bootstrap_server.url}
    form = {"action": "terminate", "pilot": f"{EAST}/{rows[0]['id']}", "reason": "x"}

    viewer = httpx.post(f"{url}/pilots", data=form, headers=headers(bootstrap_server, "vic", "viewer", **same))
    assert viewer.status_code == 403 and "needs edit permission on the DAG glidein_factory" in viewer.text
    assert httpx.get(f"{url}/", headers=headers(bootstrap_server, "vic", "viewer")).status_code == 200  # may read
    stop = {"kind": "stop", "entry": "", "frontend": "", "reason": "x"}
    assert httpx.post(f"{url}/downtimes", data=stop,
                      headers=headers(bootstrap_server, "vic", "viewer", **same)).status_code == 403

    admin = headers(bootstrap_server)
    cookie = {"Cookie": f"_token={admin['Authorization'].split()[1]}"}
    for refused in ({**admin, "Origin": "http://evil.example"},
                    {**cookie, "Origin": "http://evil.example"},
                    {**cookie, "Sec-Fetch-Site": "cross-site"},
                    cookie):  # a cookie alone: no Origin, no bearer token
        r = httpx.post(f"{url}/pilots", data=form, headers=refused)
        assert r.status_code == 403 and "another site" in r.text, (refused.keys(), r.text)
    assert httpx.get(f"{url}/pilots", headers=admin).status_code == 405  # a change is never a GET
    assert controls.recent(state.store()) == [] and controls.load(state.store(), time.time()) == []

    bad = httpx.post(f"{url}/downtimes", headers={**admin, **same},
                     data={"kind": "downtime", "entry": EAST, "end": "tomorrow", "reason": "x"})
    assert bad.status_code == 400 and "end 'tomorrow' is not a time" in html.unescape(bad.text)
    nothing = httpx.post(f"{url}/pilots", headers={**admin, **same}, data={**form, "reason": " "})
    assert nothing.status_code == 400 and "give a reason" in nothing.text
    assert controls.recent(state.store()) == []

    ok = httpx.post(f"{url}/pilots", data=form, headers={**cookie, **same, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200, ok.text
    (rec,) = controls.recent(state.store())
    assert (rec["who"], rec["action"], rec["pilots"], rec["reason"]) == ("admin", "terminate", [rows[0]["id"]], "x")


def test_a_frontends_editor_acts_on_that_frontends_pilots_only(tmp_path, monkeypatch, bootstrap_server):
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    def only_cms(self, *, method, user, access_entity=None, details=None):
        if method == "GET":
            return True
        return user.username == "cmsop" and details is not None and details.id == "glidein_frontend_cms"

    monkeypatch.setattr(SimpleAuthManager, "is_authorized_dag", only_cms)  # an auth manager with per-DAG rights
    write_config(tmp_path, example_config(), monkeypatch)
    rows = _pilots(time.time())
    cms = [r["id"] for r in rows if r["frontend"] == "cms"]
    atlas = [r["id"] for r in rows if r["frontend"] == "atlas"]
    url = f"{bootstrap_server.url}/glidein/dashboard"
    h = headers(bootstrap_server, "cmsop", "user", Origin=bootstrap_server.url)

    def act(ids: list[str]) -> httpx.Response:
        return httpx.post(f"{url}/pilots", headers=h,
                          data={"action": "retire", "reason": "r", "pilot": [f"{EAST}/{i}" for i in ids]})

    assert act(cms[:2]).status_code == 200
    refused = act([cms[2], atlas[0]])
    assert refused.status_code == 403 and "glidein_frontend_atlas" in refused.text
    whole = httpx.post(f"{url}/pilots", headers=h, data={"action": "retire", "reason": "r", "entry": EAST,
                                                         "count": str(len(rows))})
    assert whole.status_code == 403  # the entry holds atlas's pilots too
    assert httpx.post(f"{url}/downtimes", headers=h, data={"kind": "stop", "frontend": "cms", "entry": "",
                                                           "reason": "cms only"}).status_code == 200
    assert httpx.post(f"{url}/downtimes", headers=h, data={"kind": "downtime", "frontend": "cms", "entry": EAST,
                                                           "reason": "cms at east", "end": "+1h"}).status_code == 200
    for scope in ({"frontend": "", "entry": ""}, {"frontend": "", "entry": EAST}):  # would hold other frontends
        assert httpx.post(f"{url}/downtimes", headers=h,
                          data={"kind": "stop", "reason": "everyone", **scope}).status_code == 403
    recorded = controls.recent(state.store())
    assert [(r["action"], r["pilots"] and sorted(r["pilots"])) for r in recorded] == \
        [("downtime", None), ("stop", None), ("retire", sorted(cms[:2]))]


def test_the_entry_count_must_still_hold(tmp_path, monkeypatch, bootstrap_server):
    write_config(tmp_path, example_config(), monkeypatch)
    rows = _pilots(time.time())
    url = f"{bootstrap_server.url}/glidein/dashboard"
    h = headers(bootstrap_server, Origin=bootstrap_server.url)
    page = httpx.get(f"{url}/confirm", params={"entry": EAST, "action": "terminate"}, headers=h)
    assert f"Terminate all {len(rows)} pilots of entry {EAST}?" in page.text
    stale = httpx.post(f"{url}/pilots", headers=h, data={"action": "terminate", "entry": EAST, "count": "3",
                                                         "reason": "r"})
    assert stale.status_code == 409 and f"now has {len(rows)} pilots, not the 3 confirmed" in stale.text
    assert controls.pending(state.store()) == []
    ok = httpx.post(f"{url}/pilots", headers=h, data={"action": "terminate", "entry": EAST,
                                                      "count": str(len(rows)), "reason": "decommission"})
    assert ok.status_code == 200
    (req,) = controls.pending(state.store())
    assert sorted(req["pilots"]) == sorted(r["id"] for r in rows)
