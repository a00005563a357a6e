"""The Airflow assets the frontends and the factory talk through.

``glidein_requests``: each frontend run adds an event whose extra is its
request (a level per entry), like a glideinWMS glideclient ad.
``glidein_status``: each factory run adds an event whose extra counts pilots
per entry, frontend and state, like a glidefactoryclient ad; frontends read
it to know what already runs for them.
``glidein_demand_<frontend>``: a frontend with ``watch`` is also scheduled on
this asset; its watcher adds an event when idle demand appears.
"""

from __future__ import annotations

from airflow.sdk import Asset

GLIDEIN_REQUESTS = Asset("glidein_requests")
GLIDEIN_STATUS = Asset("glidein_status")

# How many recent request events the factory reads to find every frontend's latest.
REQUEST_EVENTS_WINDOW = 500


def demand_asset_name(frontend: str) -> str:
    return f"glidein_demand_{frontend}"
