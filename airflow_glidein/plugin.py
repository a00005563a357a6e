"""The Airflow plugin (entry point airflow.plugins).

Mounts the bootstrap service on the API server at /glidein: the pilot routes
(/glidein/bootstrap/...) and the authenticated pilot log viewer
(/glidein/pilots/), which the UI shows under Browse > Pilot logs.
"""

from __future__ import annotations

from urllib.parse import urlparse

from airflow.sdk import conf
from airflow.sdk.plugins_manager import AirflowPlugin

from airflow_glidein.bootstrap.app import create_app

URL_PREFIX = "/glidein"


def _base_path() -> str:
    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class GlideinPlugin(AirflowPlugin):
    name = "glidein"
    fastapi_apps = [{"app": create_app(ui=True), "url_prefix": URL_PREFIX, "name": "glidein bootstrap service"}]
    external_views = [{
        "name": "Pilot logs",
        "href": f"{_base_path()}{URL_PREFIX}/pilots/",
        "destination": "nav",
        "category": "browse",
        "url_route": "glidein-pilot-logs",
    }]
