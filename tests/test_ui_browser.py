"""The Pilots page in a real browser: Airflow's API server (with our plugin) on 127.0.0.1, headless Chromium.

Debian's chromium, driven by Playwright (its own browser download is not
used: executable_path). Screenshots go to test-output/.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.helpers import REPO, example_config, run_dag, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUT = REPO / "test-output"
pytestmark = [
    pytest.mark.usefixtures("airflow_db"),
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"),
]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page(bootstrap_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        # the UI's session: the JWT the auth manager would set at login, as its cookie
        token = bootstrap_server.admin_headers()["Authorization"].split()[1]
        context.add_cookies([{"name": "_token", "value": token, "url": bootstrap_server.url}])
        yield context.new_page()
        browser.close()


def test_pilots_page_shows_the_pilots_of_a_finished_run(ec2, tmp_path, monkeypatch, bootstrap_server, browser_page):
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=1, verify_poll=1)
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    fa = run_dag("glidein_factory")  # the second cycle's inventory puts the launched pilots in the table
    assert str(fa.state) == "success"
    OUT.mkdir(exist_ok=True)

    page = browser_page
    page.goto(f"{bootstrap_server.url}/glidein/dashboard/")
    page.wait_for_selector("text=Pilots per entry and state")
    body = page.inner_text("body")
    assert "Pilots of factory demo-factory" in body
    row = page.locator("tr", has_text="aws-us-east-1").first.inner_text()
    assert "10" in row.split()  # ten booting pilots at east
    assert "frontend cms" in body and "demand (cores)" in body and "entry.max_idle" in body
    ids = [i["InstanceId"] for i in ec2.instances("us-east-1")]
    assert all(i in body for i in ids)
    # links to the DAG runs that made them, and to their logs
    assert page.locator("a[href*='/dags/glidein_frontend_cms/runs/']").count() >= 10
    assert page.locator("a[href*='/dags/glidein_factory/runs/']").count() >= 15
    assert page.locator("a:text('logs')").count() == 15
    page.screenshot(path=str(OUT / "pilots-page.png"), full_page=True)

    # inside the Airflow UI: the plugin's external view (Browse > Pilots) embeds the same page
    page.goto(f"{bootstrap_server.url}/plugin/glidein-pilots")
    frame = page.frame_locator("iframe").first
    frame.locator("text=Pilots per entry and state").wait_for(timeout=30000)
    assert frame.locator("text=demo-factory").count() >= 1
    page.screenshot(path=str(OUT / "pilots-page-in-airflow-ui.png"), full_page=True)


def test_pilots_page_needs_a_login(bootstrap_server):
    import httpx

    assert httpx.get(f"{bootstrap_server.url}/glidein/dashboard/").status_code in (401, 403)
    ok = httpx.get(f"{bootstrap_server.url}/glidein/dashboard/data.json", headers=bootstrap_server.admin_headers())
    assert ok.status_code == 200 and ok.json()["factory"]


def test_pilots_page_charts_and_paging_through_100000_pilots(tmp_path, monkeypatch, bootstrap_server, browser_page):
    """History drawn as charts (screenshot test-output/pilots-charts.png); 100,000 pilots written straight into the
    pilot table, paged in the browser with next / previous and a filter, and every one of them reached once
    through the page's JSON, page by page."""
    import httpx

    from airflow_glidein import dashboard, history, state  # noqa: F401 - dashboard declares the page's indexes
    from bench.bench_pilots_page import fill_history, fill_pilots

    write_config(tmp_path, example_config(), monkeypatch)
    east, west = "aws-us-east-1", "aws-us-west-2"
    store = state.store()
    now = time.time()
    rows = fill_pilots(store, 100_000, [east, west], ["cms"], now)
    fill_history(store, [east, west], ["cms"], now - 900, days=2, step=900)  # two days of 15-minute samples
    history.record_factory({east: {"cms": {"busy": 321, "idle": 12, "stuck": 3}}, west: {"cms": {"busy": 100}}},
                           now)  # the newest sample, alone in its bucket: the legends show it
    history.record_request("cms", {"entries": {east: {"idle": 40, "max_running": 500,
                                                             "why": {"idle_jobs": 640}}}}, now)
    order = sorted((r["entry"], r["id"]) for r in rows)
    OUT.mkdir(exist_ok=True)

    page = browser_page
    page.goto(f"{bootstrap_server.url}/glidein/dashboard/")
    page.wait_for_selector("text=Pilots by state")
    charts = page.locator("div.charts")
    states = {charts.locator("polygon.series").nth(i).get_attribute("data-series")
              for i in range(charts.locator("polygon.series").count())}
    assert states == {"busy", "idle", "booting", "stuck"}
    busy = charts.locator("polygon[data-series=busy]").get_attribute("points").split()
    assert len(busy) >= 2 * 90  # a point per 15-minute bucket over 24 h, top and bottom edges
    legend = charts.inner_text()
    for text in ("busy 421", "idle 12", "stuck 3", "idle jobs 640", "requested idle pilots 40",
                 "requested max running 500"):
        assert text in legend
    assert charts.locator("polyline[data-series=level]").count() == 1
    charts.screenshot(path=str(OUT / "pilots-charts.png"))
    assert "All pilots (100000)" in page.inner_text("body")

    def first_pilot() -> str:
        return page.locator("table.pilots").last.locator("tr").nth(1).locator("td").nth(1).inner_text()  # after the checkbox

    assert first_pilot() == order[0][1]
    for _ in range(3):
        page.locator("nav.pages").first.get_by_text("next").click()
        page.wait_for_load_state()
    assert first_pilot() == order[300][1]
    page.locator("nav.pages").first.get_by_text("previous").click()
    page.wait_for_load_state()
    assert first_pilot() == order[200][1]
    page.screenshot(path=str(OUT / "pilots-page-100000.png"))  # the top of page 3: filters, charts, counts

    page.select_option("select[name=state]", "stuck")
    page.select_option("select[name=range]", "7d")
    page.get_by_role("button", name="Show").click()
    page.wait_for_selector("text=last 7d")
    stuck = sum(r["state"] == "stuck" for r in rows)
    assert f"All pilots ({stuck} matching)" in page.inner_text("body")
    cells = page.locator("table.pilots").last.locator("tr td:nth-child(5)").all_inner_texts()
    assert cells and set(cells) == {"stuck"}

    # every pilot once, in order, through the page's own JSON (500 a page: the table's part only)
    seen, after = [], None
    while True:
        params = {"parts": "page", "size": 500, **({"after_entry": after[0], "after_id": after[1]} if after else {})}
        data = httpx.get(f"{bootstrap_server.url}/glidein/dashboard/data.json", params=params,
                         headers=bootstrap_server.admin_headers(), timeout=60).json()
        seen += [(p["entry"], p["id"]) for p in data["page"]["pilots"]]
        after = data["page"]["next"]
        if not after:
            break
    assert seen == order
