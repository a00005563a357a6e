"""One DAG per frontend of the configuration file: glidein_frontend_<name>.

Each run: query demand -> select credentials -> plan -> publish the request
(a level per entry) on the ``glidein_requests`` asset. The frontend never
calls a provider. Parsing reads only the local configuration file.

A frontend with ``watch`` also runs as soon as idle demand appears: its
schedule adds the asset ``glidein_demand_<name>``, whose watcher (an
``IdleJobsTrigger`` in the triggerer) queries the schedds every ``poll`` s.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable

from airflow_glidein.assets import demand_asset_name
from airflow_glidein.config import config_path, get_config
from airflow_glidein.operators import (
    PlanPilotsOperator,
    PublishRequestOperator,
    QueryDemandOperator,
    SelectCredentialsOperator,
)
from airflow_glidein.sensors.triggers import IdleJobsTrigger

DOC = """
### Glidein frontend `{name}`

Looks at the idle jobs of this VO's schedds, matches them against its entries
(`{entries}`) with the frontend's `match_expr`, picks a credential per entry by
trust domain, and plans a **level** of idle pilots per entry the
glideinWMS way (a job that matches *k* entries counts 1/*k* toward each; every
number carries the limit that bound it). The level is published as an event on
the `glidein_requests` asset; the `glidein_factory` DAG provisions it.

This DAG never talks to a cloud. Look at the log of `plan_pilots` for the plan table.
{watch}"""

WATCH_DOC = """
**Event-driven:** besides its schedule, this frontend runs as soon as {threshold} or more
matching idle jobs appear (the triggerer checks every {poll} s; at most one run per
{min_interval} s), through the asset `{asset}`.
"""


def schedule_for(fe, config_file):
    """The frontend's cron schedule, or, with ``watch``, that schedule or its demand asset's watcher."""
    if fe.watch is None:
        return fe.schedule
    trigger = IdleJobsTrigger(frontend=fe.name, config_file=config_file, threshold=fe.watch.threshold,
                              poll_interval=float(fe.watch.poll), min_interval=float(fe.watch.min_interval))
    name = demand_asset_name(fe.name)
    asset = Asset(name, watchers=[AssetWatcher(name=name, trigger=trigger)])
    if not fe.schedule:
        return [asset]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(fe.schedule, timezone="UTC"), assets=[asset])


CONFIG = config_path()
_cfg = get_config(CONFIG)

for _fe in _cfg.frontends:
    _watch_doc = WATCH_DOC.format(asset=demand_asset_name(_fe.name), **_fe.watch.model_dump()) if _fe.watch else ""
    with DAG(
        dag_id=f"glidein_frontend_{_fe.name}",
        schedule=schedule_for(_fe, CONFIG),
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        tags=["glidein", "frontend"],
        doc_md=DOC.format(name=_fe.name, entries="`, `".join(_fe.entries), watch=_watch_doc),
        default_args={"retries": _cfg.factory.retries, "retry_delay": timedelta(seconds=_cfg.factory.retry_delay)},
    ) as _dag:
        _demand = QueryDemandOperator(task_id="query_demand", frontend=_fe.name, config_file=CONFIG)
        _creds = SelectCredentialsOperator(task_id="select_credentials", frontend=_fe.name, config_file=CONFIG)
        _plan = PlanPilotsOperator(
            task_id="plan_pilots", frontend=_fe.name, demand=_demand.output, credentials=_creds.output,
            config_file=CONFIG,
        )
        PublishRequestOperator(task_id="publish_request", frontend=_fe.name, request=_plan.output, config_file=CONFIG)
    globals()[_dag.dag_id] = _dag
