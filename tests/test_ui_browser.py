"""The Pilots page in a real browser: Airflow's API server (with our plugin) on 127.0.0.1, headless Chromium.

Debian's chromium, driven by Playwright (its own browser download is not
used: executable_path). Screenshots go to test-output/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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
    fe = run_dag("glidein_frontend_cms")
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
    assert page.locator(f"a[href*='/dags/glidein_frontend_cms/runs/']").count() >= 10
    assert page.locator(f"a[href*='/dags/glidein_factory/runs/']").count() >= 15
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
