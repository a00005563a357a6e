"""The Airflow plugin (entry point airflow.plugins)."""

from __future__ import annotations

from airflow.sdk.plugins_manager import AirflowPlugin


class GlideinPlugin(AirflowPlugin):
    name = "glidein"
