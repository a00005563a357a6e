"""Crash consistency: faults at every named point of submit and reap, retried, never duplicate or leak.

Three layers:
- 200+ randomized runs (seeded): the factory's own operators driven the way
  Airflow drives them (the same inputs again on retry), one fault armed per
  run at a random point of the submit or reap task. After every run: no
  launch id has more instances than it asked for, terminated ones included;
  after the run's reaping, no end-of-life instance is left.
- Every (task, point) once more as whole factory DAG runs, with Airflow's own
  retries doing the retry.
- Real SIGKILLs of the process running the submit task, then the scheduler's
  zombie handling (up_for_retry) and the retry in another process.
"""

from __future__ import annotations

import os
import random
import time

import signal
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from airflow_glidein import pilots as P
from airflow_glidein.operators import InventoryOperator, PlanCycleOperator, ReapPilotsOperator, SubmitPilotsOperator
from airflow_glidein.hooks.base import LaunchPending
from tests.faults import POINTS, TASKS, Faults
from tests.servers.fixtures import PAIR_SEED
from tests.helpers import REPO, example_config, idle_jobs, run_dag, task_states, write_config, write_queue, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

RUNS = int(os.environ.get("GLIDEIN_FAULT_RUNS", "200"))  # faulted runs in all, split across the middlewares
MIDDLEWARES = ("ec2", "openstack", "opennebula")
# EC2-compatible endpoints as the proxy plays them, with the entries' quirk profile set to match
PROFILES = {
    "ec2-eucalyptus": {"client_token": "eucalyptus", "tags": "refuse_on_create", "max_per_call": 2},
    "ec2-generic": {"client_token": "ignore", "tags": "drop", "ignore_filters": True, "max_per_call": 1},
}
LIFETIME = 3600
LAG = 25  # s new instances are missing from every listing
STEP = 10  # s of simulated time per run: a run's instances stay unlisted for the next two runs
GRACE = 60  # s the factory waits for a lost create answer's instances to be listed
REGIONS = {"aws-us-east-1": "us-east-1", "aws-us-west-2": "us-west-2"}


def fault_config(tmp_path, monkeypatch, cloud=None):
    cfg = example_config()
    cfg["factory"].update(retries=3, retry_delay=0, verify_timeout=1, verify_poll=1)
    if cloud is not None and not cloud.ec2:  # the two colliding endpoints' entries, their credentials
        cfg["entries"] = [dict(e) for e in cloud.pair.entries]
        cfg["credentials"] = cloud.pair.credentials
    for e in cfg["entries"]:
        e["limits"] = {"max_pilots": 40, "max_idle": 30, "max_per_cycle": 12, "batch_size": 2}
        e["policy"] = {"max_lifetime": LIFETIME}
        e["api_budget"] = {"requests": 100000, "per_seconds": 300}  # 200 cycles back to back, not 500 calls / 5 min
        e["listing_grace"] = GRACE
        e.pop("requirements", None)
        if cloud is not None and cloud.middleware in PROFILES:
            e["options"] = {**e.get("options", {}), "profile": cloud.middleware.removeprefix("ec2-")}
    base = cfg["frontends"][0]
    if cloud is not None:
        base = {**base, "entries": list(cloud.entries), "credentials": [c["id"] for c in cfg["credentials"]]}
    cfg["frontends"] = [{**base, "name": n, "request_ttl": 10**8} for n in ("cms", "atlas")]
    return write_config(tmp_path, cfg, monkeypatch)


def instances(ec2, live_only=False):
    out = []
    for region in REGIONS.values():
        out += ec2.instances(region, live_only=live_only)
    return out


class SimTime:
    """The randomized runs' one clock: the operators', the budget's and the test clouds' (listing lag).
    It moves STEP seconds per run, whatever the machine's speed, so which fault points a run can reach
    never depends on how long the runs before it took."""

    def __init__(self, monkeypatch, start: float):
        from airflow_glidein import budget
        from airflow_glidein.operators.base import GlideinBaseOperator

        self.t = start
        monkeypatch.setattr(GlideinBaseOperator, "now", lambda op: self.t)
        monkeypatch.setattr(budget, "CLOCK", self)

    def time(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0)


class Cloud:
    """What the randomized run needs of one middleware's test provider: its entries, every instance it
    ever made (launch id of each, terminated ones included), the live ones, aging, a fresh start.

    Every cloud lags: new instances are missing from its listing for LAG s. EC2 is moto behind the
    EC2-compatible proxy with ClientToken ignored (as moto and many EC2-compatible clouds do); Nova
    and OpenNebula are two endpoints each whose ids collide (the same server ids, VMs from 0).
    """

    def __init__(self, middleware, request, monkeypatch, clock):
        self.middleware, self.clock = middleware, clock
        self.ec2 = middleware.startswith("ec2")
        request.getfixturevalue("ec2")  # the pilot credential's connection every cloud uses
        if self.ec2:
            self.server = request.getfixturevalue("ec2_compat")
            self.server.clock = clock.time
            self.server.set(lag=LAG, **PROFILES.get(middleware, {"client_token": "ignore"}))
            self.entries = tuple(REGIONS)
            self.servers = {}
            return
        self.pair = request.getfixturevalue("nova_pair" if middleware == "openstack" else "one_pair")
        self.entries = tuple(self.pair.entry_names)
        self.servers = dict(zip(self.entries, self.pair.servers))  # entry -> its endpoint
        for server in self.servers.values():
            server.clock, server.lag = clock, LAG
        self.created: Counter = Counter()  # Nova forgets deleted servers: count them as they are made
        if middleware == "openstack":
            for nova in self.servers.values():
                self._count_creates(nova, monkeypatch)

    def credentials(self, entry):
        """(provisioning, pilot) credential ids for an entry's requests."""
        if self.ec2:
            return "aws-demo", "cms-pool-token"
        return f"{entry}-cms", f"pool-{entry}"

    def _count_creates(self, nova, monkeypatch):
        real_create = nova.create

        def create(body, mv):
            before = set(nova.servers)
            out = real_create(body, mv)
            self.created.update(nova.servers[sid]["metadata"].get(P.TAG_LAUNCH) for sid in set(nova.servers) - before)
            return out

        monkeypatch.setattr(nova, "create", create)

    def made(self) -> Counter:
        """Instances made per launch id, at every endpoint (launch ids name their entry: no collision)."""
        if self.ec2:
            return Counter(ec2_marks(i)[1] for i in instances(self.server))
        if self.middleware == "openstack":
            return Counter(self.created)
        return Counter(vm["USER_TEMPLATE"].get("GLIDEIN_LAUNCH") for one in self.servers.values()
                       for vm in one.vms.values())

    def live(self) -> list[str]:
        """Pilot keys ("entry/id") of every live instance: ids collide across the endpoints."""
        if self.ec2:
            return sorted(P.pilot_key(ec2_marks(i)[0], i["InstanceId"]) for i in instances(self.server, live_only=True))
        if self.middleware == "openstack":
            return sorted(P.pilot_key(e, s["id"]) for e, nova in self.servers.items() for s in nova.live())
        return sorted(P.pilot_key(e, str(vm["ID"])) for e, one in self.servers.items() for vm in one.live())

    def live_by_entry(self) -> dict[str, list[str]]:
        """Live pilot keys per entry, in an order that does not depend on the ids the cloud drew (EC2's are
        random): by launch id, then id; pilots of one launch are alike, so which of them is picked is not."""
        launch = self.launches()
        out: dict[str, list[str]] = {e: [] for e in self.entries}
        for key in sorted(self.live(), key=lambda k: (launch.get(k, ""), k)):
            out[P.split_key(key)[0]].append(key)
        return out

    def launches(self) -> dict[str, str]:
        """Launch id of each live pilot key."""
        if self.ec2:
            return {P.pilot_key(ec2_marks(i)[0], i["InstanceId"]): ec2_marks(i)[1]
                    for i in instances(self.server, live_only=True)}
        if self.middleware == "openstack":
            return {P.pilot_key(e, s["id"]): s["metadata"].get(P.TAG_LAUNCH, "") for e, nova in self.servers.items()
                    for s in nova.live()}
        return {P.pilot_key(e, str(vm["ID"])): vm["USER_TEMPLATE"].get("GLIDEIN_LAUNCH", "")
                for e, one in self.servers.items() for vm in one.live()}

    def age(self, keys, seconds) -> None:
        by_entry: dict[str, list[str]] = {}
        for key in keys:
            entry, pid = P.split_key(key)
            by_entry.setdefault(entry, []).append(pid)
        for entry, ids in by_entry.items():
            if self.ec2:
                self.server.age(ids, seconds, REGIONS[entry])
            elif self.middleware == "openstack":
                for sid in ids:
                    self.servers[entry].servers[sid]["created"] -= seconds
            else:
                for vid in ids:
                    self.servers[entry].vms[int(vid)]["STIME"] -= int(seconds)

    def reset(self) -> None:
        for server in self.servers.values() or [self.server]:
            server.reset()
            server.lag = LAG
        if self.ec2:
            self.server.clock = self.clock.time
            self.server.set(lag=LAG, **PROFILES.get(self.middleware, {"client_token": "ignore"}))
        else:
            self.created.clear()
            if self.middleware == "openstack":
                for nova in self.servers.values():
                    nova.ids_from(PAIR_SEED)


def ec2_marks(inst: dict) -> tuple[str, str]:
    """(entry, launch id) of an EC2 instance: its tags, or where the profile keeps none its launch key pair
    (glidein.<factory>.<entry>.<launch id>)."""
    tags = inst["TagMap"]
    if P.TAG_LAUNCH in tags:
        return tags[P.TAG_ENTRY], tags[P.TAG_LAUNCH]
    _, _, entry, launch = inst["KeyName"].split(".", 3)
    return entry, launch


class FakeTI:
    """What the operators use of the task instance: xcom_push (PlanCycle's actions)."""

    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def attempt(make_op, context, tries=4):
    """Run a task the way Airflow retries it: a fresh operator, the same inputs, until it succeeds.

    Under listing lag a retry may rightly refuse to create (an earlier call's answer was lost and its
    instances may not be listed yet): after its tries the task ends failed, as in Airflow, and the
    next runs (new launch ids) count those instances once the listing shows them.
    """
    last = None
    for n in range(1, tries + 1):
        try:
            return make_op().execute(context), n
        except LaunchPending:
            if n == tries:
                return None, n
        except Exception as exc:  # Airflow retries a task whatever it raised
            last = exc
    raise AssertionError(f"still failing after retries: {last!r}")


def random_requests(rng, cloud):
    out = {}
    for fe in ("cms", "atlas"):
        out[fe] = {"frontend": fe, "cycle": f"c{rng.random()}", "start_expr": "true", "entries": {
            e: {"idle": rng.randint(0, 6), "max_running": 20, **dict(zip(("provision", "pilot"), cloud.credentials(e)))}
            for e in cloud.entries if rng.random() < 0.8}}
    return out


def feasible(work, actions):
    """The fault points this run reaches, with how many calls each can hit, in a fixed order."""
    launches = sum(len(item["launches"]) for item in work)
    terminations = len({(a["entry"], a["action"]) for a in actions if a["action"] != "retire"})
    out = []
    if launches:
        out += [("submit", p, launches) for p in ("before_call", "after_call", "before_record")]
        if launches >= 2:
            out.append(("submit", "between_batches", launches))
    if terminations:
        out += [("reap", p, terminations) for p in ("before_call", "after_call", "between_batches", "before_record")
                if p != "between_batches" or terminations >= 2]
    return out


ALL_POINTS = [(t, p) for t in TASKS for p in POINTS]


def next_fault(run, options):
    """Every point in turn (the run's number picks where to start), so every reachable point is hit."""
    reachable = {(t, p): n for t, p, n in options}
    for k in range(len(ALL_POINTS)):
        task, point = ALL_POINTS[(run + k) % len(ALL_POINTS)]
        if (task, point) in reachable:
            return task, point, reachable[(task, point)]
    return None


@pytest.mark.parametrize("middleware", MIDDLEWARES + tuple(PROFILES))
def test_randomized_faults_never_duplicate_or_leak(middleware, request, tmp_path, monkeypatch, state_store):
    runs = -(-RUNS // len(MIDDLEWARES))  # this middleware's share of the faulted runs
    rng = random.Random(f"20261204-{middleware}")
    clock = SimTime(monkeypatch, start=time.time())
    cloud = Cloud(middleware, request, monkeypatch, clock)
    path = str(fault_config(tmp_path, monkeypatch, cloud))
    faults = Faults().install(monkeypatch)
    planned: dict[str, int] = {}
    fired: Counter = Counter()
    pending = 0
    run = 0
    while sum(fired.values()) < runs:
        run += 1
        clock.t += STEP
        assert run < runs * 3, f"only {sum(fired.values())} faults in {run} runs"
        if run % 12 == 0:  # a fresh provider now and then keeps the listings small
            cloud.reset()
            planned.clear()
        context = {"run_id": f"fault-run-{run}", "ti": FakeTI()}
        requests = random_requests(rng, cloud)
        if rng.random() < 0.6:  # some pilots reach their end of life (aged far past it: listed, whatever the lag)
            for entry, alive in cloud.live_by_entry().items():  # a few at each entry: reaps of several entries
                cloud.age(rng.sample(alive, k=min(len(alive), rng.randint(0, 3))), 30 * LIFETIME)
        inventory = InventoryOperator(task_id="inventory", config_file=path).execute(context)
        work = PlanCycleOperator(task_id="plan_cycle", requests=requests, inventory=inventory,
                                 config_file=path).execute(context)
        actions = context["ti"].pushed["actions"]
        for item in work:
            for b in item["launches"]:
                planned[b["launch_id"]] = b["count"]
        fault = next_fault(run, feasible(work, actions))
        if fault:
            task, point, calls = fault
            faults.arm(task, point, rng.randint(2, calls) if point == "between_batches" else rng.randint(1, calls))
        before = len(faults.fired)
        for item in work:
            result, _ = attempt(lambda: SubmitPilotsOperator(task_id="submit_pilots", work=item, config_file=path),
                                context)
            pending += result is None
        attempt(lambda: ReapPilotsOperator(task_id="reap_pilots", actions=actions, config_file=path), context)
        if len(faults.fired) > before:
            fired[faults.fired[-1][:2]] += 1
        faults.armed = None
        # zero duplicates for any launch id, terminated (and not yet listed) instances included
        made = cloud.made()
        assert all(n <= planned.get(lid, 0) for lid, n in made.items()), {
            lid: (n, planned.get(lid)) for lid, n in made.items() if n > planned.get(lid, 0)}
        # every termination decided this run happened, fault or not, at the pilot's own endpoint
        going = {P.pilot_key(a["entry"], a["id"]) for a in actions if a["action"] != "retire"}
        assert not going & set(cloud.live())
    if RUNS >= 100:  # a short local run (GLIDEIN_FAULT_RUNS) need not reach every point
        assert set(fired) == set(ALL_POINTS), fired
    print(f"{middleware}: {sum(fired.values())} faults fired in {run} runs: {dict(sorted(fired.items()))}; "
          f"{pending} launches waited for the lagging listing")


@pytest.mark.parametrize("task, point", [(t, p) for t in TASKS for p in POINTS])
def test_fault_point_retried_by_airflow(task, point, ec2, tmp_path, monkeypatch):
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=1, verify_poll=1)
    for e in cfg["entries"]:
        e["limits"]["batch_size"] = 2
        e["policy"] = {"max_lifetime": LIFETIME}
    cfg["frontends"][0]["request_ttl"] = 100000
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    faults = Faults().install(monkeypatch)
    if task == "reap":  # pilots at both entries reach their end of life: two terminate calls
        run_dag("glidein_factory")
        for region in REGIONS.values():
            ec2.age([i["InstanceId"] for i in ec2.instances(region)], 2 * LIFETIME, region)
    aged = {i["InstanceId"] for i in instances(ec2, live_only=True)}
    faults.arm(task, point, 2)
    run = run_dag("glidein_factory")
    assert faults.fired == [(task, point, 2)]
    states = task_states(run)
    assert str(run.state) == "success", states
    planned = {b["launch_id"]: b["count"] for item in xcom(run, "plan_cycle") for b in item["launches"]}
    made = Counter(i["TagMap"][P.TAG_LAUNCH] for i in instances(ec2))
    assert planned and all(made[lid] == n for lid, n in planned.items())  # each launch made exactly its count
    alive = {i["InstanceId"] for i in instances(ec2, live_only=True)}
    assert not alive & aged  # every end-of-life pilot went, despite the fault
    assert len(alive) == 15


KILLER = textwrap.dedent('''
    """Run the factory DAG in this process and SIGKILL it right after the first RunInstances returns."""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from airflow_glidein.hooks.ec2 import EC2PilotHook
    real = EC2PilotHook._create
    def create_then_die(self, spec, count, tags):
        real(self, spec, count, tags)
        os.kill(os.getpid(), signal.SIGKILL)
    EC2PilotHook._create = create_then_die
    import pendulum
    from airflow.dag_processing.dagbag import DagBag
    dag = DagBag(dag_folder=os.path.join(sys.argv[1], "dags")).get_dag("glidein_factory")
    dag.test(logical_date=pendulum.parse(sys.argv[2]), run_after=pendulum.parse(sys.argv[2]))
''')


def test_sigkill_after_the_api_call_then_retry_makes_no_duplicate(ec2, tmp_path, monkeypatch):
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=1, verify_poll=1)
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    when = "2026-01-01T00:00:00+00:00"
    proc = subprocess.run([sys.executable, str(script), str(REPO), when], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = ec2.instances("us-east-1") + ec2.instances("us-west-2")
    assert len(first) == 5  # the first batch was made, then the task process died

    from tests.helpers import resume_run, zombies_up_for_retry

    run_id = zombies_up_for_retry("glidein_factory")  # what the scheduler does with a task whose process vanished
    resumed = resume_run("glidein_factory", run_id)
    assert str(resumed.state) == "success", task_states(resumed)
    after = ec2.instances("us-east-1") + ec2.instances("us-west-2")
    assert len(after) == 15  # 10 + 5 planned, the killed batch not made twice
    assert Counter(i["TagMap"][P.TAG_LAUNCH] for i in after).most_common(1)[0][1] <= 5
