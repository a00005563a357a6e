"""The soak: demand rises, holds and falls to zero across two frontends and two regions while
components die, and at the end every promise of the factory is checked.

Mid-run it SIGKILLs one Celery worker, one API server and the triggerer, and restarts the throwaway
PostgreSQL once; the supervisor restarts what died. Figures: the time from a burst of idle jobs to
the first RunInstances, by step (watcher poll, frontend run, asset event, factory run, submit), and
from demand reaching zero to the last instance gone.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers.common import max_in_window
from tests.soak.cloud import Cloud, tags
from tests.soak.pool import PoolService
from tests.soak.topology import FRONTENDS, REGIONS, Topology
from tests.soak.vmsim import LIVE, VMSimulator

from tests.pg import ThrowawayPostgres

EC2_LAG = 5.0  # s a new instance is missing from listings at the proxy
EC2_THROTTLE = 0.10  # share of EC2 calls answered RequestLimitExceeded
GOAL_FIRST_LAUNCH = 15.0  # s from a burst of idle jobs to the first RunInstances (watcher polling every 5 s)
WATCH_POLL = 5.0
JOB_RUNTIME = 40  # s a synthetic job runs
ACTIVE_TI = ("running", "queued", "scheduled", "up_for_retry", "up_for_reschedule", "deferred", "restarting")
GLIDEIN_DAGS = ["glidein_factory"] + [f"glidein_frontend_{fe}" for fe in FRONTENDS]


def dsn(url: str) -> str:
    """A SQLAlchemy URL as libpq takes it (no driver name)."""
    return url.replace("+psycopg2", "")


@dataclass
class Plan:
    """The scenario's times, in seconds from the first burst.

    Demand rises until ``rise`` and is held until ``hold``; the faults come one ``step`` apart once
    demand has risen and the first instances exist (so the first burst's figures are not a fault's),
    and demand is held until the last fault has had 45 s to be felt.
    """

    minutes: float
    rise: float = 0.0
    hold: float = 0.0
    step: float = 0.0
    faults: tuple[str, ...] = ("kill worker-1", "kill api-server-1", "kill triggerer", "restart postgres")

    def __post_init__(self) -> None:
        total = self.minutes * 60
        self.rise = 0.25 * total  # more jobs every 20 s
        self.hold = 0.6 * total  # the queue held at its peak, then no new jobs: demand falls to zero
        self.step = max(10.0, 0.06 * total)


class Soak:
    def __init__(self, minutes: float, keep: bool = False) -> None:
        self.plan = Plan(minutes)
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="glidein-soak-"))
        self.dir.chmod(0o711)  # the PostgreSQL cluster below runs as the postgres user
        self.log_lines: list[str] = []
        self.faults_at: dict[str, float] = {}
        self.figures: dict[str, Any] = {}
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        line = f"[soak {time.strftime('%H:%M:%S')}] {text}"
        self.log_lines.append(line)
        print(line, flush=True)

    # ---- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        from tests.helpers import POOL_TOKEN

        self.say(f"run directory {self.dir}")
        self.pg = ThrowawayPostgres(self.dir / "pg")
        self.pg.start()
        self.cloud = Cloud()
        self.cloud.start()
        self.cloud.behind_proxy(lag=EC2_LAG, throttle=EC2_THROTTLE)
        self.pool = PoolService().start()
        for fe in FRONTENDS:
            self.pool.pool.add_schedd(f"schedd-{fe}")
        self.top = Topology(self.dir, self.pg, self.cloud.endpoint_url, self.pool.url, WATCH_POLL, POOL_TOKEN)
        self.say("airflow db migrate, sync-pools")
        self.top.prepare()
        self.say("starting scheduler, dag-processor, triggerer, 2 api-servers, 2 celery workers, haproxy")
        self.top.start()
        self.sim = VMSimulator(self.cloud, list(REGIONS), self.dir / "vms", self.top.pubkey, self.pool.url)
        self.sim.start()
        self.wait_for(lambda: set(GLIDEIN_DAGS) <= self.dag_ids(), 600, "the DAGs to be parsed")
        self.say("unpausing the glidein DAGs")
        self.top.airflow("dags", "unpause", "--treat-dag-id-as-regex", "-y", "^glidein_(factory|frontend_.*)$")
        # Unpausing starts a scheduled run of each; the watchers start in the triggerer.
        self.wait_for(lambda: self.watchers() >= len(FRONTENDS), 600, "the demand watchers in the triggerer")
        self.wait_for(lambda: self.finished_runs() >= len(GLIDEIN_DAGS), 900, "the first run of every DAG")

    # ---- the metadata DB (read only) -------------------------------------------------------------

    def sql(self, query: str, *args: Any) -> list[tuple]:
        import psycopg2

        for attempt in range(30):
            try:
                conn = psycopg2.connect(dsn(self.pg.url("airflow")))
                break
            except psycopg2.OperationalError:
                time.sleep(1)
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()
        finally:
            conn.close()

    def state_sql(self, query: str, *args: Any) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(dsn(self.pg.url("glidein_state")))
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()
        finally:
            conn.close()

    def dag_ids(self) -> set[str]:
        return {r[0] for r in self.sql("SELECT dag_id FROM dag")}

    def watchers(self) -> int:
        return self.sql("SELECT count(*) FROM trigger WHERE classpath LIKE %s AND triggerer_id IS NOT NULL",
                        "%IdleJobsTrigger")[0][0]

    def finished_runs(self) -> int:
        return self.sql("SELECT count(DISTINCT dag_id) FROM dag_run WHERE dag_id = ANY(%s) AND state IN "
                        "('success', 'failed')", GLIDEIN_DAGS)[0][0]

    def wait_for(self, cond, timeout: float, what: str) -> None:
        self.say(f"waiting for {what}")
        deadline = time.time() + timeout
        while not cond():
            if time.time() > deadline:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(2)

    # ---- the scenario -------------------------------------------------------------------------

    def demand(self, fe: str, count: int) -> None:
        self.pool.add_jobs(f"schedd-{fe}", count, {
            "RequestCpus": 1, "RequestMemory": 1000, "DESIRED_Sites": ",".join(REGIONS.values()),
            "SoakFrontend": fe, "SoakRuntime": JOB_RUNTIME, "JobUniverse": 5})

    def queue(self) -> int:
        return sum(c["idle"] + c["running"] for c in self.pool.counts().values())

    def run(self) -> None:
        p = self.plan
        t0 = time.time()
        self.t0 = t0
        self.say(f"burst: 6 idle jobs for cms, 4 for atlas; demand rises for {p.rise:.0f} s, holds until "
                 f"{p.hold:.0f} s (or 45 s past the last fault), then falls to zero")
        self.demand("cms", 6)
        self.demand("atlas", 4)
        pending = list(p.faults)
        target = {"cms": 6, "atlas": 4}
        last_add, next_fault, hold = t0, None, p.hold
        while True:
            now = time.time() - t0
            if next_fault is None and now >= p.rise and self.cloud.log.reached_moto("RunInstances"):
                next_fault = now
            if pending and next_fault is not None and now >= next_fault:
                self.fault(pending.pop(0))
                next_fault = now + p.step
                hold = max(hold, now + 45)
            if now < hold and time.time() - last_add >= 20:
                last_add = time.time()
                for fe in FRONTENDS:
                    if now < p.rise:
                        target[fe] += 2  # rising
                    have = sum(c["idle"] + c["running"] for n, c in self.pool.counts().items() if n == f"schedd-{fe}")
                    if have < target[fe]:
                        self.demand(fe, target[fe] - have)  # holding: completed jobs are replaced
            if now >= hold and not pending and self.queue() == 0:
                break
            if now > max(p.minutes * 60 * 3, 900):
                raise RuntimeError(f"the queue did not drain: {self.pool.counts()}")
            time.sleep(1)
        self.zero_at = time.time()
        self.say(f"demand is zero ({len(self.pool.finished)} jobs completed); waiting for every instance to go")
        self.wait_for(lambda: not self.live_instances() and not self.sim.live(), 900, "every instance to be gone")
        self.gone_at = max([self.sim.terminated_at.get(i, 0) for i in self.all_instances()] + [self.zero_at])
        # The DAGs stay unpaused (the scheduler leaves a paused DAG's runs unfinished): every run queued
        # by now must finish, and those are the runs checked.
        self.end_at = time.time()
        self.wait_for(lambda: not self.sql("SELECT 1 FROM dag_run WHERE state IN ('running', 'queued') AND "
                                           "queued_at <= to_timestamp(%s)", self.end_at), 900,
                      "every DAG run queued so far to finish")

    def fault(self, what: str) -> None:
        self.faults_at[what] = time.time()
        self.say(f"fault: {what}")
        if what.startswith("kill "):
            self.top.sup.kill(what.split()[1], signal.SIGKILL)
        elif what == "restart postgres":
            self.pg.restart()

    # ---- what happened ------------------------------------------------------------------------

    def all_instances(self) -> dict[str, Any]:
        return {i.id: i for region in REGIONS for i in self.cloud.instances(region) if tags(i).get("glidein:factory")}

    def live_instances(self) -> list[str]:
        return [i for i, inst in self.all_instances().items() if inst.state in LIVE]

    def check(self) -> None:
        instances = self.all_instances()
        self.figures["instances launched"] = len(instances)
        self.figures["pilots booted"] = sum(1 for vm in self.sim.vms.values() if vm.booted)
        self.figures["jobs completed"] = len(self.pool.finished)

        # 0 duplicate instances for any launch id
        planned = dict(self.state_sql("SELECT launch_id, count FROM glidein_launches"))
        made = Counter(tags(i).get("glidein:launch") for i in instances.values())
        over = {lid: (n, planned.get(lid)) for lid, n in made.items() if planned.get(lid) is None or n > planned[lid]}
        self.expect(not over, f"launches with more instances than planned (made, planned): {over}")
        self.figures["launches"] = len(made)

        # 0 instances left running
        self.expect(not self.live_instances(), f"instances left running: {self.live_instances()}")

        # every pilot's logs present
        missing = [f"{vm.entry}/{iid}" for iid, vm in self.sim.vms.items() if vm.booted
                   and not (self.top.pilot_logs / vm.entry / iid / "glidein.log").exists()]
        self.expect(not missing, f"pilots without logs: {missing}")
        uploaded = sum(1 for _ in self.top.pilot_logs.glob("*/*/glidein.log")) if self.top.pilot_logs.exists() else 0
        self.figures["pilots with logs"] = uploaded

        # every token exchanged at most once across both API servers (counted at the load balancer)
        exchanges = Counter(re.findall(r'\s200\s.*"POST /glidein/bootstrap/exchange\?instance_id=([^ &"]+)',
                                       (self.top.logs / "proxy.log").read_text(errors="replace")))
        twice = {i: n for i, n in exchanges.items() if n > 1}
        self.expect(not twice, f"instances that exchanged more than once: {twice}")
        bound = Counter(r[0] for r in self.state_sql("SELECT pilot_id FROM glidein_pilot_bindings"))
        self.expect(all(n == 1 for n in bound.values()), f"bindings per instance: {bound}")
        self.figures["exchanges"] = sum(exchanges.values())
        refused = Counter(m.group(1) for vm in self.sim.vms.values() if (vm.root / "console.log").exists()
                          for m in [re.search(r"token exchange refused \(HTTP (\d+)\)",
                                              (vm.root / "console.log").read_text(errors="replace"))] if m)
        self.figures["pilots whose exchange failed (HTTP status)"] = dict(refused)

        # the API budget never exceeded in any window
        for region in REGIONS:
            calls = self.cloud.log.of(region)
            worst = max_in_window(calls, 60)
            self.figures[f"EC2 calls {region} (max in any 60 s; budget 120)"] = f"{len(calls)} ({worst})"
            self.expect(worst <= 120, f"{region}: {worst} calls in one 60 s window, budget 120")

        if self.cloud.proxy:
            self.figures["EC2 calls throttled at the proxy"] = sum(c.status == 503 for c in self.cloud.proxy.calls)

        # no task instance left running or queued
        active = self.sql("SELECT t.dag_id, t.run_id, t.task_id, t.map_index, t.state FROM task_instance t JOIN "
                          "dag_run r ON r.dag_id = t.dag_id AND r.run_id = t.run_id WHERE t.state = ANY(%s) AND "
                          "r.queued_at <= to_timestamp(%s)", list(ACTIVE_TI), self.end_at)
        self.expect(not active, f"task instances still active: {active}")

        # every DAG run's state matches what happened
        self.check_runs()
        self.figures["restarts"] = {k: v for k, v in self.top.sup.restarts().items() if v}

    def check_runs(self) -> None:
        runs = self.sql("SELECT dag_id, run_id, state, start_date, end_date FROM dag_run WHERE dag_id = ANY(%s) AND "
                        "queued_at <= to_timestamp(%s)", GLIDEIN_DAGS, self.end_at)
        tis = self.sql("SELECT dag_id, run_id, task_id, state FROM task_instance WHERE dag_id = ANY(%s)", GLIDEIN_DAGS)
        by_run: dict[tuple, list] = {}
        for dag_id, run_id, task_id, state in tis:
            by_run.setdefault((dag_id, run_id), []).append((task_id, state))
        states = Counter(r[2] for r in runs)
        self.figures["DAG runs"] = dict(states)
        fault_times = sorted(self.faults_at.values())
        unexplained = []
        for dag_id, run_id, state, start, end in runs:
            failed = [t for t, s in by_run.get((dag_id, run_id), []) if s in ("failed", "upstream_failed")]
            if state == "success":
                self.expect(not failed, f"{dag_id} {run_id} succeeded with failed tasks {failed}")
            elif state == "failed":
                self.expect(bool(failed), f"{dag_id} {run_id} failed with no failed task")
                # a failure must be one a fault explains: the run overlapped a killed component or the restart
                s, e = start.timestamp() if start else 0, end.timestamp() if end else time.time()
                if not any(s - 120 <= f <= e for f in fault_times):
                    unexplained.append((dag_id, run_id, failed))
            else:
                self.expect(False, f"{dag_id} {run_id} still {state}")
        self.expect(not unexplained, f"failed runs no fault explains: {unexplained}")

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)
            self.say(f"FAILED: {message}")

    # ---- the figures --------------------------------------------------------------------------

    def latency(self) -> dict[str, float]:
        """The first burst, step by step, from the metadata DB and the EC2 call log.

        watcher poll: the burst -> the demand asset's event; frontend run: -> the request's event on
        glidein_requests; asset event: -> the factory run that launched reads the requests
        (collect_requests starts); factory run: -> submit_pilots starts; submit: -> RunInstances.
        """
        t0 = self.t0

        def event(asset: str) -> float | None:
            rows = self.sql("SELECT min(e.timestamp) FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                            "WHERE a.name = %s AND e.timestamp >= to_timestamp(%s)", asset, t0)
            return rows[0][0].timestamp() if rows and rows[0][0] else None

        watched = [t for t in (event(f"glidein_demand_{fe}") for fe in FRONTENDS) if t]
        requested = event("glidein_requests")
        launches = [t for t in self.cloud.log.reached_moto("RunInstances") if t >= t0]
        if not (watched and requested and launches):
            return {"incomplete": float("nan")}
        first = min(launches)
        submit = self.sql("SELECT run_id, start_date FROM task_instance WHERE dag_id = 'glidein_factory' AND task_id "
                          "LIKE %s AND start_date <= to_timestamp(%s) ORDER BY start_date DESC LIMIT 1",
                          "%submit_pilots", first)
        run_id, submit_start = submit[0]
        collect = self.sql("SELECT start_date FROM task_instance WHERE dag_id = 'glidein_factory' AND run_id = %s AND "
                           "task_id = 'collect_requests'", run_id)[0][0].timestamp()
        self.figures["launching factory run"] = run_id
        w = min(watched)
        steps = {"watcher poll": w - t0, "frontend run": requested - w, "asset event": collect - requested,
                 "factory run": submit_start.timestamp() - collect, "submit": first - submit_start.timestamp(),
                 "total": first - t0}
        return steps

    def report(self) -> None:
        steps = self.latency()
        print("\n== soak figures ==")
        print(f"scenario: {self.plan.minutes} min; EC2 behind the proxy: {EC2_LAG:.0f} s listing lag, "
              f"{EC2_THROTTLE:.0%} of calls throttled; faults at (s after the burst): "
              + ", ".join(f"{k} {v - self.t0:.0f}" for k, v in self.faults_at.items()))
        print(f"burst of idle jobs -> first RunInstances (goal {GOAL_FIRST_LAUNCH:.0f} s, watcher poll {WATCH_POLL:.0f} s):")
        for k, v in steps.items():
            print(f"  {k:<14} {v:6.1f} s")
        print(f"demand zero -> last instance gone: {self.gone_at - self.zero_at:.1f} s")
        for k, v in self.figures.items():
            print(f"{k}: {v}")
        self.figures["first launch"] = steps
        self.figures["drain"] = self.gone_at - self.zero_at
        (self.dir / "figures.json").write_text(json.dumps(self.figures, indent=1, default=str))
        if steps.get("total", 1e9) > GOAL_FIRST_LAUNCH:
            print(f"note: first launch {steps.get('total', float('nan')):.1f} s, over the {GOAL_FIRST_LAUNCH:.0f} s goal")
        print(f"{len(self.failures)} of the end checks failed" if self.failures else "every end check passed")

    def teardown(self) -> None:
        for part, step in (("sim", "stop"), ("top", "stop"), ("pool", "stop"), ("cloud", "stop"), ("pg", "stop")):
            if not hasattr(self, part):
                continue
            try:
                getattr(getattr(self, part), step)()
            except Exception as exc:  # noqa: BLE001 - tear down the rest whatever failed
                print(f"teardown: {type(exc).__name__}: {exc}")
        try:
            import redis

            redis.Redis(host="127.0.0.1", port=6379, db=5).flushdb()
        except Exception:  # noqa: BLE001
            pass
        if not self.keep and not self.failures:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"kept {self.dir} (component logs in logs/, VMs in vms/)")
