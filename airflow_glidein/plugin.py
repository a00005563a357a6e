"""The Airflow plugin (entry point airflow.plugins).

Mounts the bootstrap service on the API server at /glidein: the pilot routes
(/glidein/bootstrap/...), the authenticated pilot log viewer
(/glidein/pilots/, Browse > Pilot logs) and the Pilots page
(/glidein/dashboard/, Browse > Pilots).
"""

from __future__ import annotations

from urllib.parse import urlparse

from airflow.sdk import conf
from airflow.sdk.plugins_manager import AirflowPlugin

from airflow_glidein.bootstrap.app import Lazy, create_app

URL_PREFIX = "/glidein"


def _dashboard():
    from airflow_glidein.dashboard import create

    return create()


def _app():
    app = create_app(ui=True)
    app.mount("/dashboard", Lazy(_dashboard))  # built on first request: keeps plugin import light
    return app


def _base_path() -> str:
    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class GlideinPlugin(AirflowPlugin):
    name = "glidein"
    fastapi_apps = [{"app": _app(), "url_prefix": URL_PREFIX, "name": "glidein bootstrap service and pages"}]
    external_views = [{
        "name": "Pilots",
        "href": f"{_base_path()}{URL_PREFIX}/dashboard/",
        "destination": "nav",
        "category": "browse",
        "url_route": "glidein-pilots",
    }, {
        "name": "Pilot logs",
        "href": f"{_base_path()}{URL_PREFIX}/pilots/",
        "destination": "nav",
        "category": "browse",
        "url_route": "glidein-pilot-logs",
    }]
