"""The API rate budget: a token bucket per endpoint in the state store, on a simulated clock."""

from __future__ import annotations

import random

import pytest

from airflow_glidein.budget import ApiBudget, BudgetExhausted
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.servers.common import max_in_window, signed_envelope


def test_a_spent_budget_waits_for_the_oldest_token(sim_clock):
    b = ApiBudget("nova-test", requests=5, per_seconds=10)
    t0 = sim_clock.time()
    assert [b.acquire() for _ in range(5)] == [0, 0, 0, 0, 0]
    sim_clock.sleep(3)
    assert b.acquire() == pytest.approx(7.1)  # the first token comes back 10 s (+1% guard) after it was spent
    assert sim_clock.time() == pytest.approx(t0 + 10.1)
    assert b.used() == 1  # the first five came back together


def test_workers_share_an_endpoint_and_endpoints_are_separate(sim_clock):
    worker_a, worker_b = ApiBudget("nova-cern", 4, 60), ApiBudget("nova-cern", 4, 60)
    other = ApiBudget("one-fnal", 4, 60)
    for b in (worker_a, worker_b, worker_a, worker_b):
        assert b.acquire() == 0
    assert other.acquire() == 0  # another endpoint's budget is untouched
    assert worker_b.acquire() == pytest.approx(60.6)


def test_no_token_within_the_longest_wait_is_a_clear_error(sim_clock):
    b = ApiBudget("nova-short", requests=2, per_seconds=300, max_wait=30)
    b.acquire(2)
    with pytest.raises(BudgetExhausted, match="nova-short .2 calls per 300 s. has no token for another 301 s"):
        b.acquire()
    assert b.used() == 2


def test_never_more_than_the_budget_in_any_window(sim_clock):
    rng = random.Random(7)
    b = ApiBudget("nova-random", requests=50, per_seconds=60)
    spent = []
    for _ in range(400):
        n = rng.choice([1, 1, 1, 2, 5])
        b.acquire(n)
        spent += [sim_clock.time()] * n
        sim_clock.sleep(rng.expovariate(2.0))
    assert max_in_window(spent, 60) <= 50
    # and the budget is used, not wasted: 400+ calls in a few windows
    assert sim_clock.time() - spent[0] < 60 * (len(spent) / 50 + 2)


def test_500_servers_launched_listed_and_reaped_within_500_calls_per_5_minutes(nova, sim_clock):
    """CERN's Nova: 500 requests / 5 min. The server counts every call and would throttle past it."""
    nova.clock = sim_clock
    sim_clock.tick = 0.01  # each request takes 10 ms of simulated time
    nova.throttle.set(500, 300)
    entry = Entry(name="cern-big", middleware="openstack", region="RegionOne", image="img-glidein",
                  flavor="f-4c8g", trust_domain="cern", auth_method="app_credential",
                  api_budget={"requests": 500, "per_seconds": 300},
                  options={"network": "net-private", "multi_create": False})
    hook = pilot_hook(entry, "big-factory", "glidein_os_test")
    for batch in range(10):  # 10 launches of 50, one create call per server (multi-create off)
        launch = f"r1.cms.cern-big.{batch}"
        env = signed_envelope("openstack", {"launch_id": launch})
        spec = LaunchSpec(launch_id=launch, frontend="cms", count=50, image="img-glidein", userdata=env)
        assert len(hook.launch(spec)["created"]) == 50
    ids = [i.id for i in hook.list_pilots()]
    assert len(ids) == 500
    report = hook.terminate_verified(ids)
    assert sorted(report.gone) == sorted(ids) and report.stuck == {}
    assert nova.servers == {}

    assert len(nova.calls) > 1000  # far more than one window's budget ...
    assert nova.throttle.refused == 0  # ... yet the cloud never had to refuse one
    assert nova.max_in_window(300) <= 500
    assert sim_clock.slept >= 2 * 300 - 60  # the budget, not luck, spread them out
