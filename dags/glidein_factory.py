"""The factory DAG, glidein_factory: provision what the frontends request, reap what must go.

Runs on every ``glidein_requests`` event and on a timer. One run at a time, so
entry-wide limits hold across frontends without locks.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, TaskGroup, XComArg, task

from airflow_glidein.assets import GLIDEIN_REQUESTS
from airflow_glidein.config import config_path, get_config, pool_name
from airflow_glidein.operators import (
    CollectRequestsOperator,
    CycleCheckOperator,
    FactoryReportOperator,
    InventoryOperator,
    PlanCycleOperator,
    ReapPilotsOperator,
    SubmitPilotsOperator,
)
from airflow_glidein.sensors import PilotsTerminatedSensor

DOC = """
### Glidein factory `{name}`

The only DAG that talks to resource providers. Each API endpoint (an EC2 region,
an OpenStack or OpenNebula endpoint) has its own task group and Airflow pool. Each run:

1. `collect_requests` - the newest unexpired request of every frontend (`glidein_requests` events);
2. `inventory` - our instances at every entry, listed by tag, joined with the collector's startd
   ads into the pilot table (booting, idle, busy, retiring, terminating, boot_failed, lost,
   stopped, stuck, orphan);
3. `plan_cycle` - the reaping policy (boot/idle timeouts, lifetime with retire window, orphans,
   lost, stopped, scale-down of idle pilots) and, per entry, what to launch: requested level minus
   pilots already booting or idle, within each frontend's max running, the entry's limits (across
   all frontends), the factory totals and the entry's backoff;
4. `submit_pilots` - mapped per entry; idempotent per launch id, so a retry starts no duplicate;
5. `reap_pilots` - carries out the reaping: terminate, force-terminate (escalation), retire (drain);
6. `verify_terminations` - a deferrable sensor: waits until terminated pilots are gone at their
   providers; those still present are terminated again next cycle, then forced, then reported stuck;
7. `report` - publishes pilot counts, backoff and stuck pilots on `glidein_status` (the frontends
   read it) and prints the cycle's summary; if a listing, launch or termination failed in this run,
   `check_cycle` then logs one ERROR line per failed entry and call, and the run ends failed.

Entries: {entries}.
"""

CONFIG = config_path()
_cfg = get_config(CONFIG)
_schedule = (
    AssetOrTimeSchedule(timetable=CronTriggerTimetable(_cfg.factory.schedule, timezone="UTC"), assets=[GLIDEIN_REQUESTS])
    if _cfg.factory.schedule
    else [GLIDEIN_REQUESTS]
)


@task(task_id="work")
def _work_of(work: list, entries: list) -> list:
    """This endpoint's share of the cycle's launches (what its submit_pilots maps over)."""
    return [w for w in work if w["entry"] in entries]


with DAG(
    dag_id="glidein_factory",
    schedule=_schedule,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["glidein", "factory"],
    doc_md=DOC.format(name=_cfg.factory.name, entries=", ".join(f"`{e.name}` ({e.middleware})" for e in _cfg.entries)),
    default_args={"retries": _cfg.factory.retries, "retry_delay": timedelta(seconds=_cfg.factory.retry_delay)},
) as glidein_factory:
    _requests = CollectRequestsOperator(task_id="collect_requests", config_file=CONFIG)
    # One task group per API endpoint: every task in it calls only that endpoint and runs in its
    # Airflow pool (python -m airflow_glidein sync-pools), so the factory, however many entries and
    # frontends share the endpoint, never has more calls in flight there than the pool's slots.
    _groups = {}
    for _endpoint, _entries in sorted(_cfg.endpoints().items()):
        _names = [e.name for e in _entries]
        with TaskGroup(group_id=re.sub(r"[^A-Za-z0-9_-]", "_", _endpoint),
                       tooltip=f"{_endpoint}: {', '.join(_names)}") as _group:
            _groups[_endpoint] = (_group, _names, InventoryOperator(
                task_id="inventory", entries=_names, config_file=CONFIG, pool=pool_name(_endpoint)))
    _plan = PlanCycleOperator(
        task_id="plan_cycle", requests=_requests.output, inventory=[g[2].output for g in _groups.values()],
        config_file=CONFIG,
    )
    _actions = XComArg(_plan, key="actions")
    _submits, _reaps = [], []
    for _endpoint, (_group, _names, _inventory) in _groups.items():
        with _group:
            _pool = pool_name(_endpoint)
            _submit = SubmitPilotsOperator.partial(task_id="submit_pilots", config_file=CONFIG, pool=_pool).expand(
                work=_work_of(_plan.output, _names))
            _reap = ReapPilotsOperator(task_id="reap_pilots", actions=_actions, entries=_names, config_file=CONFIG,
                                       pool=_pool)
            _reap >> PilotsTerminatedSensor(
                task_id="verify_terminations", targets=_reap.output, config_file=CONFIG, pool=_pool,
                timeout=_cfg.factory.verify_timeout, poll_interval=_cfg.factory.verify_poll, retries=0,
            )
            _plan >> _reap
        _submits.append(_submit)
        _reaps.append(_reap)
    _report = FactoryReportOperator(
        task_id="report", inventory=[g[2].output for g in _groups.values()], actions=_actions,
        decisions=XComArg(_plan, key="decisions"), config_file=CONFIG, trigger_rule="all_done",
    )
    _report.set_upstream(_submits + _reaps)
    # the run's verdict, after the status is out (only a task that succeeds emits its asset event)
    _report >> CycleCheckOperator(task_id="check_cycle", config_file=CONFIG, trigger_rule="all_done", retries=0)
