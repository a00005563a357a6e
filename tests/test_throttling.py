"""Throttling: 30% of provider calls refused, and a full frontend + factory cycle still does its work.

The three clouds of test_e2e_multicloud, each refusing a seeded 30% of the
calls it receives: EC2 through the EC2-compatible proxy in front of moto
(RequestLimitExceeded, HTTP 503), Nova with 429 and OpenNebula with 503, each
with Retry-After. Each entry gets an API budget small enough to bind. The
budget, the hooks' backoff and the servers share a simulated clock, so waiting
is free and every call is stamped with the time the provider would count it.

oned itself answers overload in-band, not with an HTTP status: a write it
cannot take now is an XML-RPC failure ("Cannot process request, oned cluster
in election mode", INTERNAL). The hook treats it as throttling too.
"""

from __future__ import annotations

from collections import Counter

import pytest

from airflow_glidein import pilots as P
from airflow_glidein.budget import ApiBudget
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from airflow_glidein.hooks.opennebula import ATTR as ONE_ATTR
from tests.helpers import idle_jobs, run_dag, write_config, write_queue, xcom
from tests.servers.common import pool_token_connection, signed_envelope
from tests.test_e2e_multicloud import ENTRIES, multicloud_config

pytestmark = pytest.mark.usefixtures("airflow_db")

ONE_LAUNCH = ONE_ATTR[P.TAG_LAUNCH]  # the USER_TEMPLATE attribute that carries a VM's launch id
SHARE = 0.3
BUDGET = {"requests": 8, "per_seconds": 60}  # fewer than the cycle needs: the budget must spread the calls


def count_spent(monkeypatch) -> Counter:
    """Tokens taken per endpoint from here on."""
    spent: Counter = Counter()
    real_acquire = ApiBudget.acquire
    monkeypatch.setattr(ApiBudget, "acquire",
                        lambda self, n=1: (spent.update({self.endpoint: n}), real_acquire(self, n))[1])
    return spent


def single_tries(dagrun) -> None:
    """The hooks absorbed the throttling: no task needed an Airflow retry."""
    from airflow.utils.session import create_session

    with create_session() as session:
        tries = {(ti.task_id, ti.map_index): ti.try_number for ti in dagrun.get_task_instances(session=session)}
    assert set(tries.values()) == {1}, tries


def test_a_cycle_under_30_percent_throttling_launches_the_plan_once_within_budget(
        ec2_compat, nova, one, sim_clock, tmp_path, monkeypatch):
    sim_clock.tick = 0.05  # each request the test servers answer takes 50 ms of simulated time
    aws = ec2_compat
    aws.clock = nova.clock = one.clock = sim_clock
    nova.throttle.random(SHARE, seed=1)
    one.throttle.random(SHARE, seed=2)
    aws.set(throttle=SHARE, seed=3)
    jobs = idle_jobs(12, "AWS_US_EAST_1") + idle_jobs(6, "CERN", cpus=4, start=2) + idle_jobs(20, "FERMICLOUD", cpus=2, start=3)
    cfg = multicloud_config(write_queue(tmp_path, jobs))
    for e in cfg["entries"]:
        e["api_budget"] = BUDGET
        e["limits"]["batch_size"] = 1  # a launch per pilot: more calls than one window's budget
    write_config(tmp_path, cfg, monkeypatch)
    spent = count_spent(monkeypatch)

    fe = run_dag("glidein_frontend_cms")
    assert str(fe.state) == "success"
    planned = {e: p["idle"] for e, p in xcom(fe, "plan_pilots")["entries"].items()}
    assert planned == {"aws-us-east-1": 3, "cern-openstack": 6, "fermicloud": 10}
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success"
    single_tries(fa)

    # the plan, once: each launch id made exactly its batch, nothing twice
    batches = {b["launch_id"]: b["count"] for item in xcom(fa, "plan_cycle") for b in item["launches"]}
    launch_tags = ([i["TagMap"][P.TAG_LAUNCH] for i in aws.instances(live_only=False)]
                   + [s["metadata"][P.TAG_LAUNCH] for s in nova.servers.values()]
                   + [vm["USER_TEMPLATE"][ONE_LAUNCH] for vm in one.vms.values()])
    assert Counter(launch_tags) == Counter(batches)
    assert (len(aws.instances()), len(nova.live()), len(one.live())) == tuple(planned[e] for e in ENTRIES)

    # every cloud did throttle us, each needed more calls than one window allows, and none saw more than
    # the budget in any window
    seen = {"ec2-us-east-1": aws, "nova-cern": nova, "one-fnal": one}
    print(f"refused/calls: ec2 {aws.throttle.refused}/{len(aws.calls)}, "
          f"nova {nova.throttle.refused}/{len(nova.calls)}, "
          f"oned {one.throttle.refused}/{len(one.calls)}; simulated wait {sim_clock.slept:.0f} s")
    assert aws.throttle.refused and nova.throttle.refused and one.throttle.refused
    for endpoint, cloud in seen.items():
        assert len(cloud.calls) > BUDGET["requests"], endpoint
        assert cloud.max_in_window(BUDGET["per_seconds"]) <= BUDGET["requests"], endpoint
    # every call a cloud received (the refused ones included) took a token of its endpoint, and no more
    assert spent == {endpoint: len(cloud.calls) for endpoint, cloud in seen.items()}


def fermicloud_only(cfg: dict) -> dict:
    """The multicloud config cut down to its OpenNebula entry."""
    cfg["entries"] = [e for e in cfg["entries"] if e["name"] == "fermicloud"]
    frontend = cfg["frontends"][0]
    frontend["entries"], frontend["credentials"] = ["fermicloud"], ["fnal-cms", "pool-fnal"]
    cfg["credentials"] = [c for c in cfg["credentials"] if c["id"] in frontend["credentials"]]
    return cfg


def test_the_opennebula_hook_backs_off_when_oned_refuses_writes_in_band(one, sim_clock):
    one.clock = sim_clock
    one.overload = "replicating"
    one.throttle.random(0.5, seed=1)
    entry = Entry(name="fermicloud", middleware="opennebula", image="12", flavor="4", cores=4, memory_mb=4096,
                  trust_domain="fnal", auth_method="username_password", options={"terminate_settle": 0})
    env = signed_envelope("opennebula", {"factory": "f", "entry": "fermicloud", "launch_id": "r1.cms.fermicloud.0"})
    spec = LaunchSpec(launch_id="r1.cms.fermicloud.0", frontend="cms", count=6, image="12", userdata=env)
    created = pilot_hook(entry, "f", "glidein_one_test").launch(spec)["created"]
    assert sorted(created) == sorted(str(v["ID"]) for v in one.live()) and len(created) == 6
    assert one.throttle.refused and sim_clock.slept > 0  # refused, waited, tried again: nothing twice


def test_a_cycle_on_an_overloaded_oned_launches_the_plan_once_within_budget(one, sim_clock, tmp_path, monkeypatch):
    sim_clock.tick = 0.05
    one.clock = sim_clock
    one.overload = "election"  # what a loaded oned answers a write: in-band, in an HTTP 200 XML-RPC response
    one.throttle.random(SHARE, seed=4)
    pool_token_connection(monkeypatch)
    cfg = fermicloud_only(multicloud_config(write_queue(tmp_path, idle_jobs(20, "FERMICLOUD", cpus=2, start=3))))
    cfg["entries"][0]["api_budget"] = BUDGET
    cfg["entries"][0]["limits"]["batch_size"] = 1
    write_config(tmp_path, cfg, monkeypatch)
    spent = count_spent(monkeypatch)

    fe = run_dag("glidein_frontend_cms")
    assert str(fe.state) == "success"
    assert {e: p["idle"] for e, p in xcom(fe, "plan_pilots")["entries"].items()} == {"fermicloud": 10}
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success"
    single_tries(fa)

    batches = {b["launch_id"]: b["count"] for item in xcom(fa, "plan_cycle") for b in item["launches"]}
    assert Counter(vm["USER_TEMPLATE"][ONE_LAUNCH] for vm in one.vms.values()) == Counter(batches)
    assert len(one.live()) == 10
    refused = [c for c in one.calls if c.status == 0x2000]
    print(f"oned refused {len(refused)} of {len(one.calls)} calls in-band; simulated wait {sim_clock.slept:.0f} s")
    assert refused and len(refused) == one.throttle.refused
    assert {c.path for c in refused} <= {"one.template.instantiate"}  # writes only; reads are always answered
    assert len(one.calls) > BUDGET["requests"]
    assert one.max_in_window(BUDGET["per_seconds"]) <= BUDGET["requests"]
    assert spent == {"one-fnal": len(one.calls)}
