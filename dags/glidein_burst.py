"""glidein_burst: an ad-hoc backfill burst, triggered by hand from the Airflow UI.

Its params render as a form: frontend, entries, number of pilots or cores,
pilot lifetime, idle timeout, optional VO image, dry run. The burst is
validated against the configuration, planned with the frontend's
credentials, and published on ``glidein_requests`` like a frontend's request;
the factory launches its pilots and later reaps them by the burst's policy.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_glidein.config import config_path, get_config
from airflow_glidein.operators import PublishRequestOperator, SelectCredentialsOperator
from airflow_glidein.operators.burst import PlanBurstOperator, ValidateBurstOperator

DOC = """
### Ad-hoc backfill burst

Trigger this DAG with the form to start a burst of pilots now, outside the
frontends' schedules (for a backfill, a deadline, a test of a new entry).

* **frontend** - whose credentials, START expression and entries to use;
* **entries** - some of its entries (empty: all of them); pilots are split evenly over those
  that can take them now (an entry without a usable credential, or backed off by the factory
  after failed launches or boots, is left out and named in the plan);
* **pilots** *or* **cores** - how much to start (cores are turned into pilots by each entry's size);
* **lifetime_hours**, **idle_timeout_minutes** - the burst pilots' own policy
  (at most each entry's `max_lifetime`); the burst holds its pilots this long;
* **vo_image** - a VO image, only on entries that allow one;
* **dry_run** - plan and print, publish nothing.

The factory's entry limits still apply (see the `plan_cycle` log of the next
`glidein_factory` run). Burst pilots carry the tag `glidein:burst`.
"""

CONFIG = config_path()
_cfg = get_config(CONFIG)
_frontends = [f.name for f in _cfg.frontends]
_entries = [e.name for e in _cfg.entries]

with DAG(
    dag_id="glidein_burst",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    tags=["glidein", "burst"],
    doc_md=DOC,
    default_args={"retries": _cfg.factory.retries, "retry_delay": timedelta(seconds=_cfg.factory.retry_delay)},
    params={
        "frontend": Param(_frontends[0] if _frontends else "", type="string", enum=_frontends or [""],
                          title="Frontend", description="Whose credentials and entries the burst uses"),
        "entries": Param([], type="array", items={"type": "string", "enum": _entries}, title="Entries",
                         description="Empty: all of the frontend's entries"),
        "pilots": Param(None, type=["null", "integer"], minimum=1, title="Pilots",
                        description="Number of pilots in total (or give cores)"),
        "cores": Param(None, type=["null", "integer"], minimum=1, title="Cores",
                       description="Number of cores in total (or give pilots)"),
        "lifetime_hours": Param(4.0, type="number", exclusiveMinimum=0, title="Pilot lifetime (hours)"),
        "idle_timeout_minutes": Param(20, type="integer", minimum=1, title="Idle timeout (minutes)"),
        "vo_image": Param(None, type=["null", "string"], title="VO image",
                          description="Only on entries with allow_vo_image"),
        "dry_run": Param(False, type="boolean", title="Dry run", description="Plan and print; launch nothing"),
    },
) as glidein_burst:
    _valid = ValidateBurstOperator(task_id="validate_params", config_file=CONFIG, retries=0)
    _creds = SelectCredentialsOperator(task_id="select_credentials", frontend="{{ params.frontend }}",
                                       config_file=CONFIG)
    _plan = PlanBurstOperator(task_id="plan_burst", frontend="{{ params.frontend }}", credentials=_creds.output,
                              config_file=CONFIG, retries=0)
    _valid >> _creds
    PublishRequestOperator(task_id="publish_request", frontend="{{ params.frontend }}", request=_plan.output,
                           config_file=CONFIG)
