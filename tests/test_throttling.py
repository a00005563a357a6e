"""Throttling: 30% of provider calls refused, and a full frontend + factory cycle still does its work.

The three clouds of test_e2e_multicloud, each refusing a seeded 30% of the
calls it receives: moto's EC2 through a botocore event that answers
RequestLimitExceeded before the request is sent (what EC2 sends: HTTP 503),
Nova with 429 and OpenNebula with 503, each with Retry-After. Each entry gets
an API budget small enough to bind. The budget, the hooks' backoff and the
servers share a simulated clock, so waiting is free and every call is
stamped with the time the provider would count it.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from airflow_glidein import pilots as P
from airflow_glidein.budget import ApiBudget
from airflow_glidein.hooks import base
from airflow_glidein.hooks.ec2 import EC2PilotHook
from airflow_glidein.hooks.opennebula import ATTR as ONE_ATTR
from tests.helpers import idle_jobs, run_dag, write_config, write_queue, xcom
from tests.servers.common import max_in_window
from tests.test_e2e_multicloud import ENTRIES, multicloud_config

pytestmark = pytest.mark.usefixtures("airflow_db")

ONE_LAUNCH = ONE_ATTR[P.TAG_LAUNCH]  # the USER_TEMPLATE attribute that carries a VM's launch id
SHARE = 0.3
BUDGET = {"requests": 8, "per_seconds": 60}  # fewer than the cycle needs: the budget must spread the calls
LIMIT_EXCEEDED = (b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>RequestLimitExceeded'
                  b'</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>throttled'
                  b'</RequestID></Response>')


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_):
        yield self.data


class ThrottledEC2:
    """A botocore before-send handler on every EC2 client the hook makes: refuses a share, logs every call."""

    def __init__(self, clock, share: float, seed: int) -> None:
        self.clock, self.share, self.rng = clock, share, random.Random(seed)
        self.calls: list[tuple[float, str]] = []  # (time, operation) of every request that reached "EC2"
        self.refused = 0
        self.lock = threading.Lock()

    def install(self, monkeypatch) -> ThrottledEC2:
        real = EC2PilotHook._new_client

        def new_client(hook, budget):
            client = real(hook, budget)  # the hook's own budget handler comes first
            client.meta.events.register("before-send.ec2", self.before_send)
            return client

        monkeypatch.setattr(EC2PilotHook, "_new_client", new_client)
        monkeypatch.setattr(base, "_clients", {})  # no client made before the handler was there
        return self

    def before_send(self, request, **_):
        from botocore.awsrequest import AWSResponse

        with self.lock:
            self.calls.append((self.clock.time(), str(request.body)[:40]))
            if self.rng.random() >= self.share:
                return None  # botocore sends it to moto
            self.refused += 1
        return AWSResponse(request.url, 503, {"Content-Type": "text/xml"}, _Body(LIMIT_EXCEEDED))

    def max_in_window(self, window: float) -> int:
        return max_in_window([t for t, _ in self.calls], window)


def test_a_cycle_under_30_percent_throttling_launches_the_plan_once_within_budget(
        ec2, nova, one, sim_clock, tmp_path, monkeypatch):
    sim_clock.tick = 0.05  # each request the test servers answer takes 50 ms of simulated time
    nova.clock = one.clock = sim_clock
    nova.throttle.random(SHARE, seed=1)
    one.throttle.random(SHARE, seed=2)
    aws = ThrottledEC2(sim_clock, SHARE, seed=3).install(monkeypatch)
    jobs = idle_jobs(12, "AWS_US_EAST_1") + idle_jobs(6, "CERN", cpus=4, start=2) + idle_jobs(20, "FERMICLOUD", cpus=2, start=3)
    cfg = multicloud_config(write_queue(tmp_path, jobs))
    for e in cfg["entries"]:
        e["api_budget"] = BUDGET
        e["limits"]["batch_size"] = 1  # a launch per pilot: more calls than one window's budget
    write_config(tmp_path, cfg, monkeypatch)
    spent: Counter = Counter()
    real_acquire = ApiBudget.acquire
    monkeypatch.setattr(ApiBudget, "acquire",
                        lambda self, n=1: (spent.update({self.endpoint: n}), real_acquire(self, n))[1])

    fe = run_dag("glidein_frontend_cms")
    assert str(fe.state) == "success"
    planned = {e: p["idle"] for e, p in xcom(fe, "plan_pilots")["entries"].items()}
    assert planned == {"aws-us-east-1": 3, "cern-openstack": 6, "fermicloud": 10}
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success"
    from airflow.utils.session import create_session

    with create_session() as session:  # the hooks absorbed the throttling: no task needed an Airflow retry
        tries = {(ti.task_id, ti.map_index): ti.try_number for ti in fa.get_task_instances(session=session)}
    assert set(tries.values()) == {1}, tries

    # the plan, once: each launch id made exactly its batch, nothing twice
    batches = {b["launch_id"]: b["count"] for item in xcom(fa, "plan_cycle") for b in item["launches"]}
    launch_tags = ([i["TagMap"][P.TAG_LAUNCH] for i in ec2.instances(live_only=False)]
                   + [s["metadata"][P.TAG_LAUNCH] for s in nova.servers.values()]
                   + [vm["USER_TEMPLATE"][ONE_LAUNCH] for vm in one.vms.values()])
    assert Counter(launch_tags) == Counter(batches)
    assert (len(ec2.instances()), len(nova.live()), len(one.live())) == tuple(planned[e] for e in ENTRIES)

    # every cloud did throttle us, each needed more calls than one window allows, and none saw more than
    # the budget in any window
    seen = {"ec2-us-east-1": aws, "nova-cern": nova, "one-fnal": one}
    print(f"refused/calls: ec2 {aws.refused}/{len(aws.calls)}, nova {nova.throttle.refused}/{len(nova.calls)}, "
          f"oned {one.throttle.refused}/{len(one.calls)}; simulated wait {sim_clock.slept:.0f} s")
    assert aws.refused and nova.throttle.refused and one.throttle.refused
    for endpoint, cloud in seen.items():
        assert len(cloud.calls) > BUDGET["requests"], endpoint
        assert cloud.max_in_window(BUDGET["per_seconds"]) <= BUDGET["requests"], endpoint
    # every call a cloud received (the refused ones included) took a token of its endpoint, and no more
    assert spent == {endpoint: len(cloud.calls) for endpoint, cloud in seen.items()}
