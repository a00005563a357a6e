"""One DAG per frontend of the configuration file: glidein_frontend_<name>.

Each run: query demand -> select credentials -> plan -> publish the request
(a level per entry) on the ``glidein_requests`` asset. The frontend never
calls a provider. Parsing reads only the local configuration file.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_glidein.config import config_path, get_config
from airflow_glidein.operators import (
    PlanPilotsOperator,
    PublishRequestOperator,
    QueryDemandOperator,
    SelectCredentialsOperator,
)

DOC = """
### Glidein frontend `{name}`

Looks at the idle jobs of this VO's schedds, matches them against its entries
(`{entries}`) with the frontend's `match_expr`, picks a credential per entry by
trust domain, and plans a **level** of idle pilots per entry the
glideinWMS way (a job that matches *k* entries counts 1/*k* toward each; every
number carries the limit that bound it). The level is published as an event on
the `glidein_requests` asset; the `glidein_factory` DAG provisions it.

This DAG never talks to a cloud. Look at the log of `plan_pilots` for the plan table.
"""

CONFIG = config_path()
_cfg = get_config(CONFIG)

for _fe in _cfg.frontends:
    with DAG(
        dag_id=f"glidein_frontend_{_fe.name}",
        schedule=_fe.schedule,
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        tags=["glidein", "frontend"],
        doc_md=DOC.format(name=_fe.name, entries="`, `".join(_fe.entries)),
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
